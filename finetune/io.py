"""Atomic file writes: temp file in the same folder + fsync + rename, so no half-written file ever
appears under its final name (a crash or a full disk leaves the previous version intact)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "plain_file_mode"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; a finished file gets the permissions a plain open() would have given it
# (bundles and a shared weights cache are meant to be read by other users and tools).
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``. Removes the temp on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and not err.filename:
            err.filename = str(path)    # a failed write() names no file; say which one (disk full...)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def plain_file_mode(path: str | Path) -> None:
    """Give a file made by mkstemp/mkdtemp the permissions a plain open() would have (umask applied)."""
    os.chmod(path, _FILE_MODE)
