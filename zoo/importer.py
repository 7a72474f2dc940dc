"""``zoo import``: register a local weights file (``.safetensors`` or ``.pth``) as a model's cached weights,
for air-gapped machines. The file is checked against the architecture (built on the meta device) and,
when its tensor names are another library's, converted (the entry's key maps).

Sits above ``zoo.network`` (it needs the architecture) and ``zoo.sources`` (reading and converting files).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.core.checkpoint import read_tensors
from finetune.core.io import printable_name, sha256_file
from zoo import cache
from zoo.errors import IntegrityError, UsageError, WeightsError
from zoo.keymaps import apply_key_map, import_key_maps
from zoo.network import network_shapes, weights_misfit
from zoo.registry import ModelEntry, entry_pin, matches_pin, parse_digest
from zoo.resolve import get_entry
from zoo.sources import copy_in
from zoo.weightfiles import TORCH_SUFFIXES, check_safetensors, is_torch_start, load_pth, save_tensors

__all__ = ["import_weights"]


def import_weights(name: str | ModelEntry, file: str | Path, sha256: str | None = None) -> Path:
    """Register a local ``.safetensors`` or ``.pth`` as the weights of ``name`` (air-gapped machines).

    Every tensor's name and shape must fit the architecture (built on the meta device); when names do not
    match directly, the key maps of the entry's sources and those ``zoo.keymaps.import_key_maps`` lists for
    its builder (torchvision VGG) are tried. A file whose sha256 matches ``sha256`` or a digest pinned in
    the entry is recorded as verified; otherwise as trusted on first use. The manifest records the digest
    of the file as given (``sha256_download``) and of the cached safetensors (``sha256``).

    Args:
        name: a registry name.
        file: the weights file.
        sha256: optional expected digest of ``file``: 64 hex digits or a prefix of at least 8.
    Returns:
        The cached ``model.safetensors`` path.
    Raises:
        UnknownModelError, IntegrityError (digest), WeightsError (unsafe, or does not fit), CacheError.
    """
    entry = get_entry(name)
    pin = parse_digest(sha256) if sha256 is not None else None
    file = Path(file).expanduser()
    if not file.is_file():
        what = "not a regular file (a pipe, a device or a folder): save it to a file first" if file.exists() \
            else "no such file"
        raise UsageError(f"{file}: {what}; give the path of a .safetensors or .pth file")
    with cache.lock(entry.name):
        stage = cache.staging_dir(entry.name)
        try:
            return _import_staged(entry, file, stage, pin)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _import_staged(entry: ModelEntry, file: Path, stage: Path, pin: str | None) -> Path:
    raw = copy_in(file, stage)
    digest = sha256_file(raw)
    if pin is not None and not matches_pin(digest, pin):
        raise IntegrityError(f"{file.name}: sha256 {digest} does not match --sha256 {pin}; "
                             "nothing was imported; check you have the right file")
    pinned = entry_pin(entry, digest)
    fmt = _sniff_format(raw)
    if fmt == "safetensors":
        check_safetensors(raw)
        tensors = read_tensors(raw)
    else:
        tensors = load_pth(raw)
    tensors, key_map = _fit_architecture(entry, tensors)
    if fmt == "safetensors" and key_map is None:
        out = raw
    else:
        out = stage / "converted.safetensors"
        save_tensors(tensors, out, metadata={"source": f"import:{printable_name(file.name)}", "format": "pt"})
    manifest = {"source": f"import:{file.resolve()}", "sha256_download": digest,
                "sha256": digest if out == raw else sha256_file(out),
                "tofu": pin is None and pinned is None, "format": fmt, "key_map": key_map}
    if pin is not None or pinned is not None:
        manifest["verified"] = f"--sha256 {pin}" if pin is not None else f"registry pin of {pinned.id()}"
    return cache.install(entry.name, out, manifest)


def _sniff_format(path: Path) -> str:
    """"pth" for a file holding a PyTorch checkpoint (zip/pickle), "safetensors" for one that opens as
    safetensors (its header length, then its JSON); anything else is judged by its name: "pth" for .pth,
    .pt, .bin (a damaged one is then called a damaged checkpoint, not a bad safetensors file)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if is_torch_start(head):
        return "pth"
    opens_as_safetensors = (len(head) == 9 and head[8:9] == b"{"
                            and int.from_bytes(head[:8], "little") < path.stat().st_size)
    if not opens_as_safetensors and path.suffix.lower() in TORCH_SUFFIXES:
        return "pth"
    return "safetensors"


def _fit_architecture(entry: ModelEntry, tensors: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Check names and shapes with ``zoo.network.weights_misfit``; try the sources' key maps if needed."""
    candidates: list[str | None] = [None] + list(dict.fromkeys(
        [s.key_map for s in entry.sources if s.key_map] + list(import_key_maps(entry.builder))))
    first_problem = ""
    expected = network_shapes(entry)        # built once (on the meta device), whatever the maps tried
    for key_map in candidates:
        try:
            mapped = apply_key_map(key_map, tensors)
        except WeightsError as err:
            first_problem = first_problem or str(err)
            continue
        problem = weights_misfit(entry, {k: tuple(v.shape) for k, v in mapped.items()}, expected=expected)
        if not problem:
            return mapped, key_map
        first_problem = first_problem or problem
    raise WeightsError(f"the file does not fit {entry.name} ({entry.builder}): {first_problem}; "
                       "check you have the weights of this architecture")
