"""Weights files: a ``.pth`` read without running code (``torch.load(weights_only=True)``), a safetensors file
checked before it enters the cache, and tensors written as safetensors (atomically). torch and safetensors
are imported only when a file is read or written: ``zoo --help``, ``zoo list`` and ``zoo info`` import this
module through ``zoo.sources``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.core.io import SafetensorsHeaderError, atomic_write, read_safetensors_header, rewrite_safetensors_metadata
from zoo.errors import WeightsError
from zoo.text import first_line

__all__ = ["check_safetensors", "load_pth", "save_tensors", "TORCH_SUFFIXES", "is_torch_start"]

# Names a PyTorch checkpoint goes by (torchvision's .pth, .pt, transformers' pytorch_model.bin).
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def is_torch_start(head: bytes) -> bool:
    """Whether a file's first bytes open a ``torch.save`` file: a zip archive, or a pickle (the legacy format:
    PROTO and a protocol torch writes, 2 to 5; a safetensors file whose header length starts with 0x80 is not
    one, QA)."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """``finetune.core.io.read_safetensors_header`` with the zoo's error: the header of a complete safetensors file.

    Raises:
        WeightsError: the file is not a (complete) safetensors file.
    """
    path = Path(path)
    try:
        return read_safetensors_header(path)
    except (OSError, SafetensorsHeaderError) as err:
        raise WeightsError(f"{path.name} is not a valid safetensors file ({err}); check the file or its format") \
            from err


def load_pth(path: str | Path) -> dict[str, Any]:
    """Read a ``.pth`` with ``torch.load(weights_only=True)`` only; unwrap ``state_dict``/``model`` keys.

    Raises:
        WeightsError: the pickle wants to run code (refused), the file is truncated or damaged, or it holds
            no tensors.
    """
    # lazy: zoo --help / list / info import this module and must not import torch
    import pickle

    import torch

    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not is_torch_start(head):
        # torch.load would fail at random (KeyError, an "unsafe" UnpicklingError) on what is no checkpoint at all
        raise WeightsError(f"{path.name} is not a readable PyTorch checkpoint: "
                           + ("empty" if not head else "damaged (neither a zip archive nor a pickle)")
                           + "; copy or download it again")
    try:
        # from an open file: torch.load given a path named .safetensors reads it as safetensors (QA: a .pth so
        # named, a traceback), whatever its bytes say
        with open(path, "rb") as fh:
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:   # the weights-only unpickler met something it will not build
        raise WeightsError(
            f"{path.name} was refused: it is not a plain tensor checkpoint and loading it would run code from the "
            f"file ({first_line(err)[:120]}); ask for a .safetensors file or convert it where you trust it") \
            from err
    except (RuntimeError, AttributeError, TypeError, ValueError, EOFError, OSError) as err:
        # the zip reader or the stream gave out first (a cut download or copy; a small cut zip file ends in
        # an OSError "Invalid argument"): damaged, not unsafe
        raise WeightsError(f"{path.name} is not a readable PyTorch checkpoint: truncated or damaged "
                           f"({first_line(err)[:120]}); copy or download it again") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path.name} holds no state dict of tensors; export the model's state_dict()")
    # DataParallel checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def save_tensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` after making every tensor contiguous and unshared, the metadata in sorted
    order (safetensors writes it in hash order): the same file converted twice gives the same bytes, so the
    cache's and a lock file's ``weights_sha256`` can be reproduced (QA: 1 conversion in 3 differed)."""
    # lazy: zoo --help / list / info import this module and must not import torch
    from safetensors.torch import save

    seen: set[tuple[int, int]] = set()
    clean = {}
    for key, value in tensors.items():
        value = value.detach().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else (0, id(value))
        if value.numel() and ident in seen:
            value = value.clone()  # safetensors refuses tensors that share memory
        seen.add(ident)
        clean[key] = value
    # atomic_write: a failed write is the OSError it is (safetensors reports "... (os error 28)" as its own)
    data = save(clean, metadata=metadata)
    data = rewrite_safetensors_metadata(data, metadata) if metadata else data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
