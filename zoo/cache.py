"""The weights cache under ZOO_HOME: layout, manifests, locks, listing, removal and verification.

Layout (docs/internals.md)::

    $ZOO_HOME/weights/<name>/model.safetensors   the weights, always safetensors
    $ZOO_HOME/weights/<name>/manifest.json       {"name", "source", "sha256_download", "sha256", "size",
                                                  "created", "tofu"}
    $ZOO_HOME/locks/<name>.lock                  one filelock per model
    $ZOO_HOME/tmp/                               staging for downloads (same filesystem => atomic rename)

A model counts as cached only when both files exist; the manifest is written last, so an interrupted
install never looks complete. Imports no torch (``zoo list`` asks ``is_cached``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune.core.io import broken_link, plain_file_mode, sha256_file, shell_command, write_json
from zoo.errors import CacheError

__all__ = [
    "zoo_home", "scan_memo", "weights_dir", "weights_path", "manifest_path", "read_manifest", "is_cached",
    "cached_models", "remove", "verify", "check", "lock", "staging_dir", "install", "dir_name",
]

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def zoo_home() -> Path:
    """The cache root: ``$ZOO_HOME``, default ``~/.cache/zoo``. Read at every call (tests change it)."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo").expanduser()


def features_dir() -> Path:
    """Where backbone feature banks are cached (``finetune.tools.features.FeatureCache``): shared by `zoo doctor`
    and the head phase of `zoo finetune`, `zoo lr-find` and `zoo sweep` on the same model and data."""
    return zoo_home() / "features"


SCAN_MEMO_DAYS = 30      # a data folder's scan memo not used for this long is removed (by the next scan)


def scan_memo(data_dir: str | Path) -> Path:
    """Where the file checks of a data folder's scans are remembered (``finetune.data.scan_folder``'s
    ``memo``): one JSON file per folder under ZOO_HOME/scans, named after the folder's absolute path as given
    (its entries are the files' paths under it: a folder reached through a link has its own). Files found
    fine and unchanged since the last scan of that folder are not opened again. What lies there unused for
    SCAN_MEMO_DAYS (a folder not scanned since, a write cut short) is removed first."""
    where = os.path.abspath(os.fspath(data_dir)).encode("utf-8", "surrogateescape")
    folder = zoo_home() / "scans"
    old = time.time() - SCAN_MEMO_DAYS * 86400
    try:
        for memo in folder.iterdir():
            try:
                if memo.stat().st_mtime < old:
                    memo.unlink()
            except OSError:  # removed meanwhile by another scan
                pass
    except OSError:          # none yet, or unreadable
        pass
    return folder / f"{hashlib.sha256(where).hexdigest()[:32]}.json"


def dir_name(name: str) -> str:
    """A folder name for model ``name``; ad-hoc names (``timm:x``, ``hf-hub:org/repo``) lose ``:`` and ``/``."""
    safe = name.replace("/", "--").replace(":", "--")
    if not safe or safe in {".", ".."} or not re.fullmatch(r"[A-Za-z0-9._+=@-]+", safe):
        raise CacheError(f"model name {name!r} cannot be used as a cache folder; use a registry name "
                         "(zoo list) made of letters, digits, '.', '_', '-'")
    return safe


def weights_dir(name: str) -> Path:
    """``zoo_home()/weights/<name>`` (whether or not it exists)."""
    return zoo_home() / "weights" / dir_name(name)


def weights_path(name: str) -> Path:
    """``weights_dir(name)/model.safetensors``."""
    return weights_dir(name) / WEIGHTS_FILE


def manifest_path(name: str) -> Path:
    return weights_dir(name) / MANIFEST_FILE


def read_manifest(name: str) -> dict[str, Any] | None:
    """The manifest of a cached model, or None when there is none.

    Raises:
        CacheError: the manifest exists but is not valid JSON.
    """
    path = manifest_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        raise CacheError(f"manifest {path} is damaged ({err}); run `{shell_command('zoo', 'cache', 'rm', name)}` then "
                         f"`{shell_command('zoo', 'pull', name)}`")
    if not _manifest_ok(data):      # valid JSON, not a manifest (null, a list, an object without the name)
        raise CacheError(f"manifest {path} is damaged (not a zoo manifest); run "
                         f"`{shell_command('zoo', 'cache', 'rm', name)}` then `{shell_command('zoo', 'pull', name)}`")
    return data


def _manifest_ok(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("name"), str)


def is_cached(name: str) -> bool:
    """True when the weights and their manifest are both in the cache. No network, no torch."""
    try:
        return weights_path(name).is_file() and manifest_path(name).is_file()
    except CacheError:
        return False


def cached_models() -> list[dict[str, Any]]:
    """One dict per cached model: its manifest plus ``path``, ``bytes`` (the size on disk now, also where the
    manifest is damaged) and ``folder`` (its folder's name under weights/: a copied folder's manifest names
    the model it was copied from)."""
    root = zoo_home() / "weights"
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        _settle(folder)
        man = folder / MANIFEST_FILE
        weights = folder / WEIGHTS_FILE
        if not (man.is_file() and weights.is_file()):
            continue
        try:
            size = weights.stat().st_size
            info = json.loads(man.read_text(encoding="utf-8"))
        except FileNotFoundError:       # `zoo cache rm` removed it meanwhile
            continue
        except (ValueError, OSError):
            info = None
        if not _manifest_ok(info):
            info = {"name": folder.name, "damaged": True}
        info.update(path=str(weights), bytes=size, folder=folder.name)
        out.append(info)
    return out


_INSTALL_WAIT_S = 120.0


def _settle(folder: Path) -> None:
    """Weights without their manifest are an install in progress (``install`` replaces the manifest last, under
    the model's lock, while it fsyncs the weights) or an interrupted one: wait for that lock (at most
    ``_INSTALL_WAIT_S``) so a listing taken meanwhile (`zoo lock`, `zoo cache ls/verify`) neither leaves out
    nor calls damaged a model being installed."""
    if (folder / MANIFEST_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        return
    # lazy: zoo --help / list import this module; filelock only here and to write the cache
    from filelock import Timeout

    try:
        with lock(folder.name, timeout=_INSTALL_WAIT_S):
            pass
    except (Timeout, CacheError):   # (a read-only ZOO_HOME: nothing can be installing there)
        pass


def remove(name: str) -> Path:
    """Delete a model's cached weights (under its lock, so a pull in progress finishes first).

    Returns:
        The folder that was removed.
    Raises:
        CacheError: the model is not cached, or the folder cannot be deleted.
    """
    folder = weights_dir(name)
    if not folder.exists():
        raise CacheError(f"{name} is not cached (nothing under {folder}); `zoo cache ls` lists what is")
    with lock(name):
        try:
            # The manifest goes first: from that instant the model no longer counts as cached.
            manifest_path(name).unlink(missing_ok=True)
            shutil.rmtree(folder)
        except OSError as err:
            raise CacheError(f"cannot remove {folder} ({err.strerror or err}); check its permissions") from err
    return folder


def verify() -> list[str]:
    """Re-hash every cached file against its manifest.

    Returns:
        One line per problem (empty when everything matches), each naming the model and what to do.
    """
    root = zoo_home() / "weights"
    if not root.is_dir():
        return []
    found = (_problem(folder) for folder in sorted(p for p in root.iterdir() if p.is_dir()))
    return [problem for problem in found if problem]


def check(name: str) -> None:
    """Re-hash the cached weights of ``name`` against its manifest (what a cached pull returns is checked:
    the cache never serves bytes that changed on disk).

    Raises:
        CacheError: the file changed, was truncated or removed, or the manifest is damaged.
    """
    problem = _problem(weights_dir(name))
    if problem:
        raise CacheError(f"cached weights of {problem}")


def _problem(folder: Path) -> str | None:
    """What is wrong with one model folder of the cache (``<name>: ...; what to do``), None when nothing."""
    _settle(folder)
    man, weights = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
    if not man.is_file():
        # Weights without a manifest: an install that was interrupted before it completed.
        return (f"{folder.name}: no manifest (interrupted pull?); run "
                f"`{shell_command('zoo', 'cache', 'rm', folder.name)}` and pull it again")
    try:
        info = json.loads(man.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        info = None
    if not _manifest_ok(info):
        return (f"{folder.name}: manifest is damaged; run `{shell_command('zoo', 'cache', 'rm', folder.name)}` "
                "and pull again")
    name = info["name"]
    redo = f"run `{shell_command('zoo', 'pull', '--force', name)}`"
    if not weights.is_file():
        return f"{name}: {WEIGHTS_FILE} is missing; {redo}"
    size = weights.stat().st_size
    if info.get("size") is not None and size != info["size"]:
        return f"{name}: size is {size} bytes, manifest says {info['size']}: the file changed on disk; {redo}"
    digest = sha256_file(weights)
    if digest != info.get("sha256"):
        return (f"{name}: sha256 {digest[:16]}... does not match the manifest "
                f"({str(info.get('sha256'))[:16]}...): the file changed on disk; {redo}")
    return None


def lock(name: str, timeout: float = -1):
    """A cross-process ``filelock.FileLock`` for model ``name`` (``zoo_home()/locks/<name>.lock``).

    Raises:
        CacheError: the lock folder cannot be created (read-only ZOO_HOME).
    """
    # lazy: zoo --help / list import this module; filelock only to write the cache
    from filelock import FileLock

    folder = zoo_home() / "locks"
    _mkdir(folder)
    return FileLock(str(folder / f"{dir_name(name)}.lock"), timeout=timeout)


def staging_dir(name: str) -> Path:
    """A fresh private folder ``zoo_home()/tmp/<name>~XXXX`` (same filesystem as the weights, so the final
    rename is atomic). Call it while holding ``lock(name)``: leftovers of a killed pull are removed then."""
    parent = zoo_home() / "tmp"
    _mkdir(parent)
    prefix = f"{dir_name(name)}~"  # "~" never occurs in dir_name(), so "a~" cannot match "a.b~"
    # Whoever holds the model's lock owns its staging area: any folder left there is from a dead process.
    for stale in parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def install(name: str, file: str | Path, manifest: dict[str, Any]) -> Path:
    """Move ``file`` (a safetensors file on the cache's filesystem) into place and write its manifest.

    The caller holds ``lock(name)``. The old manifest is removed first and the new one written last, so a
    crash at any point leaves either the previous complete model or one that does not count as cached.

    Returns:
        The final ``model.safetensors`` path.
    """
    folder = weights_dir(name)
    _mkdir(folder)
    final = folder / WEIGHTS_FILE
    try:
        manifest_path(name).unlink(missing_ok=True)
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())
        plain_file_mode(file)   # staged downloads come from a 0700 temp dir: readable by other users once cached
        os.replace(file, final)
        record = {"name": name, **manifest, "size": final.stat().st_size,
                  "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(manifest_path(name), record, indent=2, sort_keys=True)
    except OSError as err:
        raise CacheError(f"cannot write {folder} ({err.strerror or err}); free disk space or set ZOO_HOME "
                         "to a writable folder") from err
    return final


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        link = broken_link(folder)
        if link is not None:        # mkdir said "File exists" (QA)
            raise CacheError(f"cannot create {folder}: {link}; create that folder, or set ZOO_HOME to a writable "
                             "folder") from err
        raise CacheError(f"cannot create {folder} ({err.strerror or err}); set ZOO_HOME to a writable folder") \
            from err
