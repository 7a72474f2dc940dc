"""The run lock's heartbeat (zoo.runlock, helper-111): a lock whose holder cannot be checked here (another host on a
shared folder, another pid namespace of this host: a container restarted on the same boot) is taken over once its
holder stopped touching it for ``silent_bound``; a beating one, and one of an earlier version (no ``beat_s``), are
refused. No test waits for the bound: a silent lock is backdated with os.utime far beyond it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_reliability_temps import ROOT, Writer, _claim, _other_pid_namespace, _run_folder

LONG_AGO = 10 * 24 * 3600.0     # ten days: far beyond any bound


def _other(tag: str) -> str:
    return "0" * 8 if tag != "0" * 8 else "1" * 8


def _records() -> dict[str, dict]:
    """A lock of another host, and one of another pid namespace of this host and boot (a container restarted)."""
    from finetune.core.tempfiles import boot_tag, host_tag

    base = {"pid": 4242, "start": "1", "command": "zoo finetune x", "started": "then", "beat_s": 30}
    return {"host": {**base, "host": "another-host", "tag": _other(host_tag()), "boot": "0" * 8},
            "namespace": {**base, "host": socket.gethostname(), "tag": _other(host_tag()), "boot": boot_tag()}}


def _write_lock(run: Path, record: dict, age: float = 0.0) -> Path:
    from zoo.runlock import LOCK

    lock = run / LOCK
    lock.write_text(json.dumps(record))
    if age:
        then = time.time() - age
        os.utime(lock, (then, then))
    return lock


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("where", ["host", "namespace"])
def test_a_silent_lock_of_another_host_or_namespace_is_taken_over_with_a_note(tmp_path, where):
    """Before: `zoo finetune --resume RUN` after a container restart (same host name and boot, a new pid namespace;
    `docker restart`, a pod restarted after OOMKilled) was refused, "in use by pid N on HOST (another container or pid
    namespace) ...; delete the lock if that process is gone", until the user deleted it. A lock that beats and has
    been silent for longer than its bound is now taken over, saying how long it was silent."""
    from zoo.runlock import LOCK, RunLock

    run = _run_folder(tmp_path)
    _write_lock(run, _records()[where], LONG_AGO)
    notes: list[str] = []
    lock = RunLock(run).acquire(notes.append)
    try:
        assert len(notes) == 1 and "pid 4242" in notes[0] and "silent for" in notes[0], notes
        assert "heartbeat" in notes[0]
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run / LOCK).exists()


@pytest.mark.parametrize("where", ["host", "namespace"])
def test_a_beating_lock_of_another_host_or_namespace_is_refused_by_the_folders_clock(tmp_path, monkeypatch, where):
    """A lock touched just now is refused; its age is read on the folder's own clock (a probe file made there), so
    this host's clock ahead of a file server's by more than the bound does not make a live holder's lock stale."""
    from zoo.runlock import SILENT_S, RunLock, RunLockedError

    run = _run_folder(tmp_path)
    lock = _write_lock(run, _records()[where])
    ahead = time.time
    monkeypatch.setattr(time, "time", lambda: ahead() + 10 * SILENT_S)
    with pytest.raises(RunLockedError, match=r"in use by pid 4242 .*taken over once silent for 10 minutes"):
        RunLock(run).acquire()
    assert json.loads(lock.read_text())["command"] == "zoo finetune x"      # untouched
    assert [n for n in os.listdir(run) if n.endswith(".tmp")] == []          # (the probe is gone)


@pytest.mark.parametrize("beat", [None, "30", True, -1, 0])
def test_a_lock_that_does_not_beat_is_refused_however_old(tmp_path, beat):
    """An earlier version's lock (no beat_s), or a damaged beat_s, keeps the rule it had: refused, whatever its age
    (its holder cannot be told gone)."""
    from zoo.runlock import RunLock, RunLockedError

    run = _run_folder(tmp_path)
    for record in _records().values():
        record = {k: v for k, v in record.items() if k != "beat_s"} | ({} if beat is None else {"beat_s": beat})
        _write_lock(run, record, LONG_AGO)
        with pytest.raises(RunLockedError, match="in use by pid 4242"):
            RunLock(run).acquire()


def test_the_heartbeat_keeps_a_live_holders_lock_fresh_and_stops_at_release(tmp_path, monkeypatch):
    """The holder's record says it beats; its thread touches the lock (here backdated far beyond the bound), so
    another namespace's process is refused; release stops the thread and removes the lock."""
    from zoo import runlock
    from zoo.runlock import LOCK, RunLock, RunLockedError

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    run = _run_folder(tmp_path)
    path = run / LOCK
    lock = RunLock(run).acquire()
    try:
        assert json.loads(path.read_text())["beat_s"] == 0.05
        then = time.time() - LONG_AGO
        os.utime(path, (then, then))
        assert _wait_for(lambda: path.stat().st_mtime > then + LONG_AGO / 2), "the lock was not touched"
        elsewhere = _other(runlock.host_tag())
        monkeypatch.setattr(runlock, "host_tag", lambda: elsewhere)      # seen from another pid namespace
        with pytest.raises(RunLockedError, match="another container or pid namespace"):
            RunLock(run).acquire()
        monkeypatch.undo()
        beater = lock._beater
        assert beater is not None and beater.daemon and beater.is_alive()
    finally:
        lock.release()
    assert not beater.is_alive() and not path.exists()
    assert "zoo-lock-heartbeat" not in [t.name for t in threading.enumerate()]


@pytest.mark.parametrize("how", ["taken over", "removed"])
def test_a_holder_woken_after_its_lock_was_taken_over_says_so_once_and_leaves_the_new_lock(tmp_path, monkeypatch,
                                                                                         capfd, how):
    """A holder stopped for longer than the bound (SIGSTOP, a laptop asleep) is taken as gone and its lock taken over
    (by another host or namespace). Woken, it finds at its next beat that the lock is no longer its own: one line on
    stderr (whatever --quiet), ``lost`` set, no more touches; its release leaves the new holder's lock alone. A lock
    deleted by hand is said as removed."""
    from zoo import runlock
    from zoo.runlock import LOCK, RunLock

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    run = _run_folder(tmp_path)
    path = run / LOCK
    lock = RunLock(run).acquire()
    newer = json.dumps(_records()["host"]) + "\n"
    try:
        aside = run / "new-holder"
        aside.write_text(newer)
        if how == "removed":
            path.unlink()
        else:
            os.replace(aside, path)          # (the take-over: the new holder's lock in place of ours)
        assert _wait_for(lambda: lock.lost), "the holder did not notice"
        assert _wait_for(lambda: not lock._beater.is_alive())
    finally:
        lock.release()
    assert path.read_text() == newer if how == "taken over" else not path.exists()
    err = capfd.readouterr().err
    said = "taken over by another process" if how == "taken over" else "was removed"
    assert err.count("zoo: warning:") == 1 and said in err, err


def test_a_process_holding_the_lock_exits_promptly(tmp_path):
    """The thread is a daemon: a process that ends without release (an exception, sys.exit) exits at once, not after
    its next beat (issue 23: prompt exits, under torchrun too)."""
    code = ("import sys, zoo.runlock as r; r.HEARTBEAT_S = 3600.0; lock = r.RunLock(sys.argv[1]).acquire(); "
            "assert lock._beater.is_alive(); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=120, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 3, done.stderr


def test_a_run_killed_in_another_pid_namespace_is_resumed_here_once_its_lock_is_silent(tmp_path):
    """End to end, the container restart: the lock of a claim in another pid namespace of this host (unshare), left
    as a kill -9 leaves it and silent beyond the bound (backdated), is taken over by the resume here."""
    from zoo.runlock import LOCK

    prefix = _other_pid_namespace()
    if prefix is None:
        pytest.skip("no unprivileged pid namespace here (unshare)")
    run = tmp_path / "run"
    writer = Writer(run / "metrics.csv", kind="finetune", prefix=prefix)      # (claims RUN: a run in there)
    left = (run / LOCK).read_text()
    assert json.loads(left)["beat_s"] > 0
    assert writer.finish() == 0
    _write_lock(run, json.loads(left), LONG_AGO)          # what its kill -9 leaves, silent since
    _claim(run, "resume")
    assert not (run / LOCK).exists()


@pytest.mark.parametrize("content", [b"\xff\xfe{", b'{"pid": 1e400}', b'{"pid": 100000000000000000000000}'])
def test_a_lock_not_utf8_or_naming_an_impossible_pid_is_an_unreadable_lock(tmp_path, content):
    """Before: a lock file written over with bytes that are not UTF-8, or naming a pid no process has, raised
    UnicodeDecodeError / OverflowError out of check() and acquire() (a traceback from `zoo finetune`, `zoo export`,
    `zoo report`). Now it is an unreadable lock: refused while fresh (being written), taken over once older."""
    from zoo.runlock import LOCK, RunLock

    run = _run_folder(tmp_path)
    path = run / LOCK
    path.write_bytes(content)
    then = time.time() - LONG_AGO
    os.utime(path, (then, then))
    RunLock(run).check()
    notes: list[str] = []
    lock = RunLock(run).acquire(notes.append)
    try:
        assert notes == [f"note: took over the lock of {run}, which was unreadable (damaged, or cut short while "
                         "written): its writer is taken as gone"], notes
    finally:
        lock.release()
    assert not path.exists()


@pytest.mark.parametrize("how", ["not utf-8", "stderr closed"])
def test_the_heartbeat_thread_never_raises(tmp_path, monkeypatch, capfd, how):
    """Before: a holder's lock written over with bytes that are not UTF-8 raised UnicodeDecodeError in the heartbeat
    thread, and a lost lock's warning to a closed stderr raised ValueError there: Python printed the thread's
    traceback. Now the first is a lock lost (one warning), the second a warning said nowhere; the thread ends."""
    import io

    from zoo import runlock
    from zoo.runlock import LOCK, RunLock

    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    if how == "stderr closed":
        closed = io.StringIO()
        closed.close()
        monkeypatch.setattr(sys, "stderr", closed)
    run = _run_folder(tmp_path)
    path = run / LOCK
    lock = RunLock(run).acquire()
    try:
        if how == "not utf-8":
            path.write_bytes(b"\xff\xfe")
        else:
            path.unlink()
        assert _wait_for(lambda: not lock._beater.is_alive()), "the heartbeat did not end"
    finally:
        lock.release()
    assert not raised, raised
    assert lock.lost
    if how == "not utf-8":
        assert capfd.readouterr().err.count("zoo: warning:") == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_a_folder_named_as_the_lock_neither_hangs_nor_is_moved_aside(tmp_path):
    """Before: a FIFO at FOLDER/.zoo.lock made `zoo export` / `zoo report` / `zoo predict` (lock_holder) and `zoo
    finetune --out FOLDER` wait forever for a writer; a folder there was moved aside as `.zoo.lock.stale.PID` and
    the command failed with "Is a directory (FOLDER/.zoo.lock.stale.PID)". Now the FIFO is an unreadable lock (taken
    over once old), and the folder is refused in one line, left where it was."""
    from zoo.runlock import LOCK, RunLock, RunLockedError, lock_holder

    run = _run_folder(tmp_path)
    path = run / LOCK
    os.mkfifo(path)
    then = time.time() - LONG_AGO
    os.utime(path, (then, then))
    heard: list[object] = []
    asker = threading.Thread(target=lambda: heard.append(lock_holder(run)), daemon=True)
    asker.start()
    asker.join(timeout=30)
    if asker.is_alive():        # (free the reader waiting on the FIFO)
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert heard == [None], "lock_holder waited on the FIFO"
    notes: list[str] = []
    RunLock(run).acquire(notes.append).release()
    assert len(notes) == 1 and "which was unreadable" in notes[0] and not path.exists()

    path.mkdir()
    os.utime(path, (then, then))
    with pytest.raises(RunLockedError, match=f"^{path} is a folder, not the lock file zoo writes: remove it"):
        RunLock(run).acquire()
    assert path.is_dir() and not (run / f"{LOCK}.stale.{os.getpid()}").exists()


def test_a_holder_that_lost_its_folder_leaves_the_new_holders_marker_and_log(tmp_path, monkeypatch, capfd):
    """A command whose new folder was taken over while it was stopped (SIGSTOP past the bound), woken, that then ends
    having written nothing but its log: its claim's cleanup removed log.txt and the marker, by then the ones of the
    process that took the folder over (which had written nothing else yet). Now the cleanup leaves a lost folder be."""
    from zoo import runlock
    from zoo.outdir import LOCK, MARKER, claim_out

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "out"
    newer = json.dumps(_records()["host"]) + "\n"
    with claim_out(out, "finetune") as mode:
        assert mode == "new"
        (out / "log.txt").write_text("ours\n")
        aside = tmp_path / "new-holder"
        aside.write_text(newer)
        os.replace(aside, out / LOCK)                  # taken over; the new holder writes its marker and log
        (out / MARKER).write_text(json.dumps({"kind": "finetune", "command": "zoo finetune x"}))
        (out / "log.txt").write_text("theirs\n")
        assert _wait_for(lambda: "taken over" in capfd.readouterr().err)
    assert (out / LOCK).read_text() == newer and (out / "log.txt").read_text() == "theirs\n"
    assert json.loads((out / MARKER).read_text())["command"] == "zoo finetune x"
