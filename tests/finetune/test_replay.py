"""finetune.data.replay: an evaluation pass kept after its first full pass, within a memory budget."""
from __future__ import annotations

import pytest
import torch

import finetune.data.replay as replay
from finetune.core import host
from finetune.data.replay import KeptPass, budget


def _batches(n: int = 3) -> list:
    return [(torch.full((2, 3, 4, 4), k, dtype=torch.uint8), torch.tensor([k, k])) for k in range(n)] + [None]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and all(
        torch.equal(u, v) for u, v in zip(x, y))) for x, y in zip(a, b))


def test_a_full_pass_is_kept_for_its_own_loader_only():
    loader, other, batches = object(), object(), _batches()
    kept = KeptPass()
    assert kept.get(loader) is None
    assert list(kept.record(loader, batches)) == batches        # passed through unchanged
    assert kept.get(loader) == batches
    assert kept.get(other) is None                               # another loader (a new phase's): not its pass
    kept.clear()
    assert kept.get(loader) is None


def test_a_pass_left_early_keeps_nothing():
    loader, kept = object(), KeptPass()
    for _ in kept.record(loader, _batches()):
        break                       # an evaluation that raised midway
    assert kept.get(loader) is None
    assert _same(list(kept.record(loader, _batches())), _batches())     # recorded on its next full pass
    assert kept.get(loader) is not None


def test_a_pass_beyond_the_budget_is_not_kept_nor_recorded_again(monkeypatch):
    one = sum(t.nbytes for t in _batches()[0])
    monkeypatch.setattr(replay, "BUDGET_BYTES", 2 * one)       # two of the three batches fit
    loader, kept = object(), KeptPass()
    assert _same(list(kept.record(loader, _batches())), _batches())
    assert kept.get(loader) is None
    monkeypatch.setattr(replay, "BUDGET_BYTES", 10 * one)
    list(kept.record(loader, _batches()))
    assert kept.get(loader) is None       # its size is known: not copied again each epoch
    fresh = object()
    list(kept.record(fresh, _batches()))
    assert kept.get(fresh) is not None


def test_a_batch_in_a_workers_shared_memory_is_kept_as_a_copy():
    x = torch.arange(48, dtype=torch.uint8).view(1, 3, 4, 4).share_memory_()
    loader, kept = object(), KeptPass()
    list(kept.record(loader, [(x, torch.tensor([1]))]))
    (kx, ky), = kept.get(loader)
    assert torch.equal(kx, x) and not kx.is_shared() and ky.tolist() == [1]


def test_the_host_budget_is_positive_capped_and_shared_by_a_machines_processes(monkeypatch):
    one = budget(torch.device("cpu"))
    assert 0 < one <= replay.BUDGET_BYTES
    monkeypatch.setattr(replay, "memory_available", lambda: 8 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")        # torchrun's 4 processes on this machine: 2 GiB / 4 each
    assert budget(torch.device("cpu")) == (2 << 30) // 4


@pytest.mark.gpu
def test_the_device_budget_is_positive_and_capped():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert 0 < budget(torch.device("cuda")) <= replay.BUDGET_BYTES


def test_a_pass_that_lost_an_image_is_not_kept_so_later_passes_read_it_again():
    """An image that failed to load in the first pass (a file being copied, a network filesystem's hiccup)
    was left out of every later epoch's validation, the head guard's and the final evaluation (whose per-image
    probabilities then went missing): such a pass is not kept, and later passes read the files as before."""

    class Loader:
        dataset = range(7)            # seven images; the pass below gives six (one failed)

    loader, kept = Loader(), KeptPass()
    assert _same(list(kept.record(loader, _batches())), _batches())
    assert kept.get(loader) is None
    Loader.dataset = range(6)         # the next pass gives every image: it is kept
    assert _same(list(kept.record(loader, _batches())), _batches())
    assert _same(kept.get(loader), _batches())


def test_the_host_budget_stays_within_a_containers_memory_limit(monkeypatch, tmp_path):
    """Inside a container /proc/meminfo tells the whole machine's memory (64 GiB here): a 4 GiB container
    with 3 GiB in use (half a GiB of it reclaimable page cache) got the full 2 GiB budget, enough for the
    kernel to kill the run. The budget is a quarter of what the container's limit leaves (1.5 GiB)."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 << 30}\n")
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    (v2 / "memory.stat").write_text(f"anon 1\ninactive_file {1 << 29}\nactive_file 7\n")
    (tmp_path / "proc_cgroup").write_text("0::/\n")              # (a container's own cgroup namespace)
    monkeypatch.setattr(host, "CGROUP_ROOT", str(v2))
    monkeypatch.setattr(host, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.setattr(host, "_meminfo", lambda path, key, unit, real=host._meminfo: (
        64 << 30 if key == "MemAvailable:" else real(path, key, unit)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert budget(torch.device("cpu")) == (3 << 29) // 4
    (v2 / "memory.max").write_text("max\n")              # no limit: the machine's memory decides
    assert budget(torch.device("cpu")) == replay.BUDGET_BYTES


def test_the_device_budget_leaves_the_training_its_peak(monkeypatch):
    """On CUDA the budget counted every block the caching allocator held unused as free, those the training
    reserved for its peak included (80 GB card, the training's peak 75 GB, 10 GB held between epochs): an
    eighth of 70 GB, the full 2 GiB kept on the device, and a batch size that filled the card ran out of
    memory in epoch 2. Free is what no process holds plus what the allocator holds beyond the peak."""
    gb = 1 << 30
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (4 * gb, 80 * gb))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 76 * gb)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 10 * gb)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 75 * gb)
    assert budget(torch.device("cuda", 0)) == 5 * gb // 8
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 20 * gb)     # a small peak
    assert budget(torch.device("cuda", 0)) == replay.BUDGET_BYTES
