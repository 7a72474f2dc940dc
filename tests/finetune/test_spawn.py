"""Worker processes as macOS and Windows start them ("spawn": a fresh interpreter that imports torch and unpickles
what it is given) and as the program chose (``multiprocessing.set_start_method``), on this Linux box."""
from __future__ import annotations

import multiprocessing
import pickle

import pytest
import torch

import finetune.data.loaders as loaders
from finetune.core.config import FinetuneConfig
from finetune.data import ImageDataset, make_loader, resolve_workers, scan_folder
from finetune.engine import build_setup
from tests.finetune.test_train import DATA_CONFIG, STAGES, tiny_model


@pytest.mark.parametrize("method, workers", [("spawn", 0), ("forkserver", 0), ("fork", 3)])
def test_auto_workers_for_a_small_pass_where_each_worker_imports_torch(monkeypatch, method, workers):
    """A spawned worker imports torch before its first batch (3.5-4.6 s on this box, 0.04 s forked:
    docs/benchmarks.md, "Worker processes"): a pass of fewer than MIN_IMAGES_FOR_WORKERS images decodes in the main
    process there, as a small single pass does everywhere; a larger one, or a number given, keeps its workers."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setattr("finetune.core.host.cpu_quota", lambda: None)    # (not the test machine's cgroup limit)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(loaders, "worker_context", lambda: multiprocessing.get_context(method))
    assert resolve_workers(-1, "cpu", batches=3, images=96) == workers
    assert resolve_workers(-1, "cpu", batches=30, images=960) == 4
    assert resolve_workers(2, "cpu", batches=3, images=96) == 2


def test_the_loaders_follow_the_programs_start_method_without_choosing_one(image_folder, monkeypatch):
    """A loader's workers start as the program chose (``set_start_method``), else as the platform does; making
    the loader chooses nothing for the process (a DataLoader left alone takes multiprocessing's default context,
    which fixes the start method: the caller's own ``set_start_method`` then failed)."""
    from finetune.core.host import worker_context

    data = scan_folder(image_folder, val_split=0.25, seed=0)
    monkeypatch.setattr(multiprocessing.context._default_context, "_actual_context", None)   # as a fresh process
    loader = make_loader(ImageDataset(data.train), 8, train=True, workers=1)
    assert loader.multiprocessing_context.get_start_method() == multiprocessing.get_all_start_methods()[0]
    assert multiprocessing.get_start_method(allow_none=True) is None
    multiprocessing.set_start_method("spawn")
    assert worker_context().get_start_method() == "spawn"
    assert make_loader(ImageDataset(data.train), 8, train=True, workers=1).multiprocessing_context.get_start_method() \
        == "spawn"


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_what_the_workers_get_pickles(image_folder, decode):
    """Under spawn a worker gets its dataset, transform, sampler and collate function pickled: every loader a run
    makes (training, validation; the device-decode path's), with augmentation on, goes through pickle whole."""
    data = scan_folder(image_folder, val_split=0.25, seed=0)
    config = FinetuneConfig(epochs=1, batch_size=8, workers=1, device="cpu", quiet=True, fast_head=False,
                            decode=decode, hflip=0.5, brightness=0.3)
    setup = build_setup(tiny_model(), STAGES, DATA_CONFIG, data.train, data.val, config, head="fc")
    try:
        for loader in (setup.train_loader, setup.val_loader):
            loader = getattr(loader, "loader", loader)     # a DevicePrefetcher holds its DataLoader
            for part in (loader.dataset, loader.batch_sampler, loader.collate_fn):
                pickle.loads(pickle.dumps(part))
    finally:
        setup.close()


def test_a_spawned_worker_loads_the_batches_a_forked_one_does(image_folder):
    """The training loader's batches (augmented, seeded per image) under spawn are those of fork and of the main
    process. About 6 s here (the spawned worker imports torch)."""
    data = scan_folder(image_folder, val_split=0.25, seed=0)
    config = FinetuneConfig(epochs=1, batch_size=8, workers=1, device="cpu", quiet=True, fast_head=False,
                            hflip=0.5, brightness=0.3)
    setup = build_setup(tiny_model(), STAGES, DATA_CONFIG, data.train, data.val, config, head="fc")
    try:
        dataset = setup.train_loader.dataset
        batches = {}
        for method in ("main", "fork", "spawn"):
            loader = make_loader(dataset, 8, train=True, workers=0 if method == "main" else 1)
            if method != "main":
                loader.multiprocessing_context = multiprocessing.get_context(method)
            loaders.set_loader_epoch(loader, 0, 1)
            batches[method] = [b for b in loader]
            loaders.close_loader(loader)
        for method in ("fork", "spawn"):
            assert len(batches[method]) == len(batches["main"])
            for got, want in zip(batches[method], batches["main"]):
                assert all(torch.equal(g, w) for g, w in zip(got, want)), method
    finally:
        setup.close()


@pytest.fixture
def forkserver_method(monkeypatch):
    """This process as Python 3.14 makes it on Linux: forkserver its start method, its server not started yet."""
    from multiprocessing import forkserver

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "forkserver")
    server = forkserver.ForkServer()
    monkeypatch.setattr(forkserver, "_forkserver", server)
    return server


def test_the_forkserver_zoo_starts_preloads_what_a_worker_needs(forkserver_method):
    """Each worker a forkserver forks has what the server imported: without torch and the package there, each
    imports them itself before its first batch, as a spawned worker does (docs/benchmarks.md)."""
    from finetune.core.host import FORKSERVER_PRELOAD, worker_context

    assert worker_context().get_start_method() == "forkserver"
    assert forkserver_method._preload_modules == list(FORKSERVER_PRELOAD)
    assert {"torch", "finetune.data"} <= set(FORKSERVER_PRELOAD) and FORKSERVER_PRELOAD[0] == "__main__"


def test_a_forkserver_the_program_set_up_or_started_is_left_alone(forkserver_method):
    """The server is one per process: a preload the program set, or a server it already started, stays as it is."""
    from finetune.core.host import worker_context

    forkserver_method.set_forkserver_preload(["json"])
    worker_context()
    assert forkserver_method._preload_modules == ["json"]
    forkserver_method.set_forkserver_preload(["__main__"])
    forkserver_method._forkserver_pid = -1                 # (started: its preload can no longer change)
    worker_context()
    assert forkserver_method._preload_modules == ["__main__"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_forkserver_preload_under_fork_or_spawn(monkeypatch, forkserver_method, method):
    from finetune.core.host import worker_context

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: method)
    assert worker_context().get_start_method() == method
    assert forkserver_method._preload_modules == ["__main__"]


FORKSERVER_RUN = """
import multiprocessing, sys
from multiprocessing import forkserver
multiprocessing.set_start_method("forkserver")
from finetune.data import ImageDataset, build_transform, close_loader, make_loader, scan_folder
from tests.finetune.test_train import DATA_CONFIG
dataset = ImageDataset(scan_folder(sys.argv[1], val_split=0.25, seed=0).train, build_transform(DATA_CONFIG, False))
loader = make_loader(dataset, 8, train=True, workers=1)
batches = sum(1 for _ in loader)
with open(f"/proc/{forkserver._forkserver._forkserver_pid}/cmdline", "rb") as fh:
    print(batches, fh.read().replace(b"\\0", b" ").decode())
close_loader(loader)
"""


def test_a_real_forkserver_started_by_a_loader_preloads_torch_and_the_package(image_folder):
    """A process whose start method is forkserver (3.14's on Linux): the server its first loader starts was told
    to import torch and finetune.data (its command line; Linux's /proc). About 10 s here (the server imports torch)."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", FORKSERVER_RUN, str(image_folder)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    batches, command = done.stdout.strip().split(" ", 1)
    assert int(batches) == 4 and "'torch', 'PIL.Image', 'finetune.data'" in command, command
