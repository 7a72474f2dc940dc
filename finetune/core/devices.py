"""What a kind of device can do, asked the same way by every layer: the dtype of a run's sums there, and whether a
copy between it and the host may be asynchronous. Two rules, each in one place, read by device type (``cpu``,
``cuda``, ``mps``); CPU and CUDA keep what they always had, Apple's MPS gets what it supports.

- **float64.** MPS has no float64 tensors at all: creating or casting one raises "Cannot convert a MPS Tensor to
  float64 dtype as the MPS framework doesn't support float64" (pytorch/pytorch#122602, closed by the maintainers as
  a known limitation of Metal). The epoch's loss and metric sums stay on the device (no host wait per step, issue
  23) in :func:`sum_dtype`: float64 on the CPU and CUDA, float32 on MPS. Values already on the host are widened
  there (after their copy), whatever the device.
- **non_blocking copies.** On CUDA a copy from pinned host memory is asynchronous and one from pageable memory is
  made synchronous by the driver, so ``non_blocking=True`` is safe. On MPS a non_blocking copy from pageable host
  memory can read its source after Python has freed it (pytorch/pytorch#189690: wrong values, no error), and one to
  the host is only complete after a synchronisation (the PyTorch tutorial "A guide on good usage of non_blocking
  and pin_memory()", "Other copy directions"). :func:`copies_async` says where ``non_blocking`` is asked for:
  everywhere but MPS (on the CPU it changes nothing).

None of this has run on Apple hardware here: the MPS answers follow torch's documented limits and are tested on the
CPU through a simulation of them (tests/finetune/test_mps.py).
"""
from __future__ import annotations

import torch

__all__ = ["NO_FLOAT64", "BLOCKING_COPIES", "sum_dtype", "copies_async"]

# device types without float64 tensors (read at each call: the tests force the CPU into it to simulate MPS)
NO_FLOAT64 = frozenset({"mps"})
# device types whose copies to and from the host must block (read at each call, as NO_FLOAT64)
BLOCKING_COPIES = frozenset({"mps"})


def sum_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of sums kept on ``device`` (an epoch's loss and hit counts, the mirror test's per-image scores):
    float64, where a few thousand batch losses add up without float32's rounding; float32 where the device has no
    float64 (MPS)."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64 else torch.float64


def copies_async(device: torch.device | str) -> bool:
    """Whether a copy between the host and ``device`` is asked to be ``non_blocking``: not on MPS (see the module
    docstring). The caller passes it as ``tensor.to(device, non_blocking=copies_async(device))``."""
    return torch.device(device).type not in BLOCKING_COPIES
