"""What a process may use of its machine (``finetune.core.host``): a container's CPU quota and memory limit read from
fake cgroup trees (v2 and v1), torchrun's share of the cores, and the threads zoo's entry point sets from them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.core import host
from finetune.data.loaders import resolve_workers

ROOT = Path(__file__).resolve().parents[2]


def _cgroups(monkeypatch, tmp_path: Path, proc_line: str, files: dict[str, str], cores: int = 128) -> Path:
    """A fake /sys/fs/cgroup under ``tmp_path`` holding ``files`` (path -> content), this process in the cgroup
    that ``proc_line`` (a /proc/self/cgroup line) names, on a machine of ``cores`` cores."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc_line + "\n")
    monkeypatch.setattr(host, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(host, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return root


def test_a_pods_cpu_limit_on_a_big_node_sets_the_cores_and_the_gpu_workers(monkeypatch, tmp_path):
    """cgroup v2, a Kubernetes pod limited to 8 CPUs on a 128-core node: the pod's cgroup has the quota, its
    container's cgroup below it none. 8 cores, so a GPU run starts 7 workers, not 127."""
    _cgroups(monkeypatch, tmp_path, "0::/kubepods/pod1/c1", {
        "cgroup.controllers": "cpu memory", "kubepods/pod1/cpu.max": "800000 100000\n",
        "kubepods/pod1/c1/cpu.max": "max 100000\n"})
    assert host.cpu_quota() == 8.0 and host.usable_cpus() == 8
    assert resolve_workers(-1, "cuda") == 7 and resolve_workers(-1) == 2


def test_a_fractional_quota_rounds_up_and_cgroup_v1_is_read(monkeypatch, tmp_path):
    """cgroup v1 (``docker run --cpus 2.5`` on an older host): cpu.cfs_quota_us / cpu.cfs_period_us under the cpu
    controller's mount, named as /proc/self/cgroup lists it (cpu,cpuacct)."""
    _cgroups(monkeypatch, tmp_path, "4:cpu,cpuacct:/docker/abc", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert host.cpu_quota() == 2.5 and host.usable_cpus() == 3


def test_no_quota_leaves_the_affinity_and_a_namespaced_root_is_read(monkeypatch, tmp_path):
    _cgroups(monkeypatch, tmp_path, "0::/", {"cgroup.controllers": "cpu", "cpu.max": "max 100000\n"}, cores=16)
    assert host.cpu_quota() is None and host.usable_cpus() == 16 and resolve_workers(-1, "cuda") == 15
    (Path(host.CGROUP_ROOT) / "cpu.max").write_text("200000 100000\n")      # inside a cgroup namespace: "/"
    assert host.usable_cpus() == 2
    Path(host.PROC_CGROUP).unlink()                                           # no /proc (not Linux)
    assert host.cpu_quota() is None and host.usable_cpus() == 16


def test_the_tightest_memory_limit_of_the_cgroups_above_counts(monkeypatch, tmp_path):
    """A container's limit leaves 3.5 GiB (4 - 1 used + 0.5 of page cache the kernel reclaims); its parent's, 1 GiB."""
    gib = 1 << 30
    _cgroups(monkeypatch, tmp_path, "0::/a/b", {
        "cgroup.controllers": "memory", "a/b/memory.max": f"{4 * gib}\n", "a/b/memory.current": f"{gib}\n",
        "a/b/memory.stat": f"anon 1\ninactive_file {gib // 2}\n",
        "a/memory.max": f"{2 * gib}\n", "a/memory.current": f"{gib}\n", "memory.max": "max\n",
        "memory.current": "5\n"})
    assert host._cgroup_room() == gib
    assert host.memory_available() <= gib
    (Path(host.CGROUP_ROOT) / "a" / "memory.max").write_text("max\n")
    assert host._cgroup_room() == 3 * gib + gib // 2


def test_torchruns_processes_share_the_cores_unless_the_launcher_bound_each(monkeypatch, tmp_path):
    _cgroups(monkeypatch, tmp_path, "0::/", {}, cores=16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host.process_cpus() == 4 and resolve_workers(-1, "cuda") == 3
    # --numa-binding / Slurm's --cpu-bind: this process runs on 4 of the 16 cores its launcher may use
    parent = __import__("os").getppid()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)) if pid == parent else set(range(4)))
    assert host.process_cpus() == 4 and resolve_workers(-1, "cuda") == 3     # (divided again: 1 core, 0 workers)


_THREADS = r"""
import os, sys
from finetune.core import host
host.CGROUP_ROOT, host.PROC_CGROUP = sys.argv[1], sys.argv[2]
os.sched_getaffinity = lambda _pid: {0, 1}
from zoo import process
print(process.threads_within_quota())
import torch
print(torch.get_num_threads())
print(process.describe())
"""


@pytest.mark.parametrize("quota, given, expect", [("100000 100000", None, ("1", "1")),
                                                  ("max 100000", None, ("None", None)),
                                                  ("100000 100000", "2", ("None", "2"))])
def test_the_entry_point_sets_torchs_threads_to_a_quota_below_the_cores(tmp_path, quota, given, expect):
    """A container allowed 1 CPU on a 2-core machine: zoo sets OMP_NUM_THREADS=1 before torch is imported, and a
    run's log says so; no quota, or OMP_NUM_THREADS already set by the user (or torchrun), and nothing changes."""
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "cpu.max").write_text(quota + "\n")
    (tmp_path / "proc").write_text("0::/\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if given is not None:
        env["OMP_NUM_THREADS"] = given
    out = subprocess.run([sys.executable, "-c", _THREADS, str(tmp_path / "cg"), str(tmp_path / "proc")], cwd=ROOT,
                         env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120, check=True)
    set_, threads, said = out.stdout.splitlines()
    assert set_ == expect[0]
    if expect[1] is not None:
        assert threads == expect[1]
    assert ("threads: 1, the CPUs this container's quota allows" in said) == (set_ == "1")


def test_a_quota_is_shared_by_torchruns_processes_also_where_the_launcher_bound_each(monkeypatch, tmp_path):
    """Review (helper-110): a pod limited to 8 CPUs on a 64-core node, torchrun's 4 processes each bound to 16 cores
    (--numa-binding): the quota is the pod's, shared by the 4, so each has 2 CPUs of it (1 GPU worker). Before: each
    took min(16, 8) = 8 (7 workers each: 28 decoding processes and 4 trainers on 8 CPUs of quota)."""
    _cgroups(monkeypatch, tmp_path, "0::/", {"cgroup.controllers": "cpu", "cpu.max": "800000 100000\n"}, cores=64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host.process_cpus() == 2                                          # unbound: 8 // 4
    parent = __import__("os").getppid()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)) if pid == parent else set(range(16)))
    assert host.process_cpus() == 2 and resolve_workers(-1, "cuda") == 1     # was 8 and 7
    (Path(host.CGROUP_ROOT) / "cpu.max").write_text("max 100000\n")          # no quota: the bound share, as before
    assert host.process_cpus() == 16


@pytest.mark.parametrize("value, count", [(None, 1), ("", 1), ("abc", 1), ("2.5", 1), ("0", 1), ("-3", 1),
                                          ("3", 3), (" 3 ", 3)])
def test_a_launchers_process_count_is_a_whole_number_of_one_or_more(monkeypatch, value, count):
    """helper-161: the one reader of WORLD_SIZE and LOCAL_WORLD_SIZE (``host.launcher_count``): unset, empty, not a
    whole number or below 1 is one process; a launcher's whole number is itself."""
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert host.launcher_count(name) == count


def test_every_reader_of_the_process_counts_takes_junk_as_one_process(monkeypatch, tmp_path):
    """helper-161: WORLD_SIZE / LOCAL_WORLD_SIZE were parsed five ways. A value no launcher writes ("abc", a shell's
    leftover) was one process to zoo.process and launch.zoo_launch, a ValueError traceback in ddp.setup, in the
    workers' core count (host.process_cpus) and in the kept pass's budget (replay.budget), and a job of several
    processes to lastwords (it dialled MASTER_ADDR's store). Every one reads it as one process now."""
    import torch

    from finetune.core import distributed as ddp, lastwords
    from finetune.core.launch import zoo_launch
    from finetune.data import replay
    from zoo import process

    _cgroups(monkeypatch, tmp_path, "0::/", {}, cores=16)
    monkeypatch.setattr(replay, "memory_available", lambda: 1 << 34)
    budget = replay.budget(torch.device("cpu"))
    dialled: list = []
    monkeypatch.setattr(lastwords.dist, "TCPStore", lambda *a, **k: dialled.append(a))
    for name, value in {"WORLD_SIZE": "abc", "LOCAL_WORLD_SIZE": "abc", "TORCHELASTIC_RUN_ID": "j",
                        "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert not process.under_torchrun() and zoo_launch() == ("zoo",)
    assert host.process_cpus() == 16 and replay.budget(torch.device("cpu")) == budget
    assert not ddp.setup("cpu").enabled
    assert lastwords._job_store() is None and dialled == []
