"""Process-wide settings (zoo.process): made by the CLI's entry point, never by the library."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


_FAULTS = r"""
import resource, sys, torch
from zoo.process import keep_freed_memory
print(keep_freed_memory())
for _ in range(2):                              # warm-up steps
    x = torch.ones(16 * 2**20)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):                             # 64 MB freed and asked for again, as a training step does
    x = torch.ones(16 * 2**20)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or not hasattr(__import__("os"), "confstr")
                    or "glibc" not in (__import__("os").confstr("CS_GNU_LIBC_VERSION") or "").lower(),
                    reason="glibc's malloc only")
def test_keep_freed_memory_for_the_next_step(tmp_path):
    """The CLI tunes glibc's malloc once per process: a 64 MB block freed and asked for again
    (what every training step does with its activations) is not faulted in again page by page; the
    user's own choice (ZOO_MALLOC=system, GLIBC_TUNABLES, LD_PRELOAD) is left alone."""
    import os
    import subprocess
    import sys

    def run(**env):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")}
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env}).stdout.split()
        return out[0] == "True", int(out[1])

    tuned, tuned_faults = run()
    system, system_faults = run(ZOO_MALLOC="system")
    assert tuned and not system
    # glibc as shipped faults every 64 MB step in again (thousands of faults each with 4 kB pages, tens with
    # huge pages); kept, the block faults in again at most now and then (0-4 steps in 20 measured on a busy
    # 2-core machine): fewer than half as many faults, whatever the page size.
    assert system_faults >= 20
    assert tuned_faults <= system_faults // 2
    assert run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] is False     # the process already chose




def test_the_library_leaves_malloc_alone_and_the_cli_sets_it(tmp_path):
    """Resolving a device (what every training path does) changes nothing process-wide; a zoo command does,
    and, unlike the thread count, a run does not print it (helper-149)."""
    import subprocess
    import sys

    code = ("import gc; from finetune.engine import resolve_device; resolve_device('cpu'); from zoo import process; "
            "print(process.keep_freed_memory.cache_info().currsize, gc.get_threshold()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    cached, young = out.stdout.split()
    assert cached == "0" and int(young) < 50_000          # Python's own thresholds: nothing raised them
    from click.testing import CliRunner

    from zoo import process
    from zoo.cli import cli

    process.keep_freed_memory.cache_clear()
    import gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert CliRunner().invoke(cli, ["list"]).exit_code == 0
        assert process.keep_freed_memory.cache_info().currsize == 1
        # set, and not said at every start (helper-149: a line no run needed; docs/guide/performance.md has it)
        said = process.describe()
        assert said is None or "memory" not in said
        assert gc.get_threshold() == (process.GC_YOUNG_THRESHOLD, 20, 100)    # fewer young collections
        gc.set_threshold(10**6, 50, 1000)
        process.fewer_collections()
        assert gc.get_threshold() == (10**6, 50, 1000)                        # never lowered
    finally:
        gc.set_threshold(*before)


_EXIT = r"""
import atexit, gc, os, sys, tempfile, weakref
marker = tempfile.NamedTemporaryFile(delete=False, prefix="zoo-exit-").name
class Owner: pass
owner = Owner()
owner.cycle = owner                                   # only a collection would free it
weakref.finalize(owner, os.unlink, marker)            # an atexit-time cleanup, like a dataset's failure log
atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0, "marker", marker, flush=True))
del owner
sys.argv = ["zoo", "--version"]
from zoo.cli import main
main()
"""


def test_the_cli_exits_without_a_final_collection_and_keeps_its_exit_cleanups():
    """``zoo`` ends by freezing the garbage collector (the interpreter's last collections walked every object
    torch and timm made: ~0.75 s per process), and what atexit cleans up (weakref finalizers: temp files)
    still goes; the exit code is the command's."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _EXIT], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    frozen = [ln for ln in lines if ln.startswith("frozen")]
    assert frozen and frozen[0].split()[1] == "True"
    assert not Path(frozen[0].split()[-1]).exists()         # the finalizer ran at exit


_ENDING = r"""
import atexit, os, sys, threading, time, types
class Teardown:
    def __del__(self, write=os.write):                # (bound now: the teardown clears the modules' names)
        write(1, b"module teardown ran\n")
def probe():                  # a module made after zoo froze the collector: the interpreter's teardown frees it
    module = types.ModuleType("teardown_probe")
    module.keep = Teardown()
    sys.modules["teardown_probe"] = module
    sys.stdout.write("atexit ran\n")
def late():
    time.sleep(0.3)
    sys.stdout.write("thread done\n")                 # buffered: the pipe is not a terminal
threading.Thread(target=late).start()                 # not a daemon: the exit waits for it
import concurrent.futures
idle = concurrent.futures.ThreadPoolExecutor(2)       # left alive: its idle workers are woken at exit, not waited on
idle.submit(int).result()
atexit.register(probe)
sys.argv = ["zoo", *sys.argv[1:]]
from zoo.cli import main
main()
"""


@pytest.mark.parametrize("args, code", [(["--version"], 0), (["no-such-command"], 2)])
def test_the_cli_exits_as_python_does_after_its_command(args, code):
    """A command that ended leaves with its exit code as Python leaves: a thread that is not a daemon finishes,
    atexit handlers run, a ThreadPoolExecutor left alive does not hang the exit, and the interpreter's teardown
    runs (a module made at exit is freed). helper-148's ``os._exit`` after the atexit handlers (0.2-0.3 s) is not
    taken: it lost ``python -m cProfile -o F -m zoo``'s profile (written after the module returns) and would end a
    notebook that calls ``main()`` (docs/benchmarks.md, "The small job's fixed costs")."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _ENDING, *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == code, done.stderr
    lines = done.stdout.splitlines()
    assert lines.index("thread done") < lines.index("atexit ran")     # threads first, then atexit: Python's order
    assert "module teardown ran" in lines


def test_a_profiler_around_zoo_gets_its_profile(tmp_path):
    """``python -m cProfile -o F -m zoo ...`` writes F (scripts/gpu_checks.sh --profile does this)."""
    import subprocess
    import sys

    prof = tmp_path / "run.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "zoo", "--version"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert prof.stat().st_size > 0


def test_launcher_rank_and_torchrun(monkeypatch):
    from zoo.process import launcher_rank, under_torchrun

    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_rank() == 0 and not under_torchrun()
    monkeypatch.setenv("RANK", "abc")
    assert launcher_rank() == 0
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_rank() == 3 and not under_torchrun()          # a RANK without torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert under_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not under_torchrun()                                   # torchrun with one process: nobody to wait for
