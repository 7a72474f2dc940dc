"""Safe file I/O: atomic writes (temp file in the same folder + fsync + rename, so no half-written file ever
appears under its final name; a crash or a full disk leaves the previous version intact), and the one
safetensors header reader (no torch, no pickle) that the feature cache and the zoo's weights and bundles use,
and the one YAML reader (registry files, configs, bundles)."""
from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shlex
import struct
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

import yaml

from finetune.core import yamlschema
from finetune.core.launch import zoo_launch
from finetune.core.tempfiles import TEMP_SUFFIX, temp_prefix

__all__ = ["UNLISTED_FOLDER", "OUTPUT_MARKER", "broken_link", "printable", "printable_name", "shell_command",
           "atomic_write", "atomic_write_bytes", "atomic_write_text", "write_json", "csv_text", "write_file",
           "plain_file_mode", "read_safetensors_header", "parse_safetensors_header", "rewrite_safetensors_metadata",
           "SafetensorsHeaderError", "MAX_SAFETENSORS_HEADER", "no_room",
           "read_json_object", "sha256_file", "yaml_problem", "human_size", "resume_command",
           "new_run_command"]

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024   # safetensors' own limit on the JSON header


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; a finished file gets the permissions a plain open() would have given it
# (bundles and a shared weights cache are meant to be read by other users and tools).
_FILE_MODE = 0o666 & ~_umask()


def no_room(err: BaseException) -> bool:
    """A write that failed for lack of room where it was going: a full disk (ENOSPC), a quota (EDQUOT), a
    file-size limit (EFBIG: FAT32, ``ulimit -f``) or a read-only mount (EROFS). The one test of it: running
    the command again will not help, writing elsewhere will."""
    return isinstance(err, OSError) and err.errno in {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


# How Rust's std::io::Error shows an OS error; safetensors' writer reports a full disk as
# "SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)" (0.6 on), and
# 0.4 / 0.5 (allowed) as "... IoError(Os { code: 28, kind: StorageFull, message: ... })" (Rust's Debug form).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+),")


class _KeepWriteError:
    """A binary file whose first failed write is remembered: torch.save reports a full disk as its own
    RuntimeError ("unexpected pos ..."), which says neither that the disk is full nor which file."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._fh.flush()


def write_file(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(fh)`` into the file ``path`` (for writers that take a file object, like ``torch.save``).

    Raises:
        OSError: a write failed (disk full...), even when ``write`` turned it into an error of its own.
    """
    with open(path, "wb") as fh:
        sink = _KeepWriteError(fh)
        try:
            write(sink)  # type: ignore[arg-type]
            fh.flush()
        except OSError:
            raise
        except Exception as err:
            if sink.error is not None:
                raise sink.error from err
            raise


def _os_error(err: BaseException) -> OSError | None:
    """The OS error behind a writer's own exception (safetensors: "... (os error 28)"), or None."""
    if isinstance(err, OSError):
        return err
    found = _RUST_OS_ERROR.search(str(err))
    if found is None:
        return None
    code = int(found.group(1) or found.group(2))
    return OSError(code, os.strerror(code) if code in errno.errorcode else str(err))


def resume_command(run_dir: str | Path, *more: str | Path) -> str:
    """The command that continues the ``zoo finetune`` run in ``run_dir`` from its checkpoint (``more``: options after
    it), quoted to paste into a shell: the one spelling of every line that names it. Under torchrun, the torchrun
    launch with this job's process count (``launch.zoo_launch``), not the one process of a plain ``zoo``. The run
    folder absolute, as every path :func:`new_run_command` names: the line runs pasted from any folder."""
    return shell_command(*zoo_launch(), "finetune", "--resume", *_absolute(Path(run_dir), *more))


def new_run_command(*options: str | Path, model: str = "MODEL", data: str | Path = "DIR") -> str:
    """A new ``zoo finetune`` run of ``model`` on ``data`` (``options`` after them), launched as this process was
    (``launch.zoo_launch``: under torchrun, torchrun with this job's process count), quoted as
    :func:`resume_command`: the one spelling of every line that names a new run (``rerun.start_over_command``:
    one into a run folder, filled from its records). Each ``Path`` made absolute (a str is a word or a placeholder,
    ``DIR``, as given): pasted from another folder, a relative ``--config`` or ``--data`` named nothing (helper-153)."""
    return shell_command(*zoo_launch(), "finetune", model, "--data", *_absolute(data, *options))


def _absolute(*words: str | Path) -> list[str | Path]:
    """``words`` with each ``Path`` absolute (``os.path.abspath``: no symlink resolved, as the user named it)."""
    return [Path(os.path.abspath(w)) if isinstance(w, Path) else w for w in words]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``. Removes the temp on failure.

    Raises:
        OSError: writing failed, naming ``path``; also when the writer reported an OS error as its own
            exception (safetensors' SafetensorError), so a full disk reads the same whoever wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (the writer in the name: where no lock keeps other writers out, a temp whose writer is gone is known as a
    # write cut short, `finetune.core.tempfiles.writer_running`)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
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
        os_err = _os_error(err) if isinstance(err, Exception) else None
        if os_err is None:
            raise
        if not os_err.filename:
            os_err.filename = str(path)    # a failed write() names no file; say which one (disk full...)
        if os_err is err:
            raise
        raise os_err from err


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    atomic_write(path, write)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (read back as NaN), in dicts, lists and tuples: the strict JSON every file zoo writes is
    (summary.json, doctor.json, a sweep's records)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """``rows`` as CSV text with ``\\n`` line ends (``csv.writer``'s quoting: a cell with a comma, quote or line
    break quoted): the one CSV writer of findings.csv, lr_find.csv, confusion.csv and zoo eval's reports."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_json(path: str | Path, data: Any, **options: Any) -> None:
    """``data`` as JSON and a newline, in UTF-8, written atomically: the one JSON writer of run folders, reports,
    bundles, output-folder markers and the cache. ``options``: ``json.dumps``'s (``indent``, ``sort_keys``,
    ``default``; ``ensure_ascii=False`` only for text whose file names are escaped already: a name that is not
    UTF-8 holds surrogates, which UTF-8 cannot encode).

    Raises:
        OSError: as :func:`atomic_write`. TypeError / ValueError: ``data`` is not JSON (``default`` aside).
    """
    atomic_write_text(path, json.dumps(data, **options) + "\n")


def plain_file_mode(path: str | Path) -> None:
    """Give a file made by mkstemp/mkdtemp the permissions a plain open() would have (umask applied)."""
    os.chmod(path, _FILE_MODE)


# How the reason for a folder that cannot be listed begins (bad_files.txt, predict's and eval's warnings):
# here, below the data layer, so that the CLI, which imports no torch, tells a folder from an image by it
UNLISTED_FOLDER = "folder cannot be read"

# The file every zoo command writes first into its output folder (zoo.outdir): here, below the data layer, so
# that the scan knows a run folder, bundle or report (curves.png, confusion.png) for zoo's output, not images
OUTPUT_MARKER = ".zoo-run.json"


def archive_kind(path: str | Path) -> str | None:
    """The archive suffix ``path`` is named with (``.zip``, ``.tar.gz``...), or None: a download not yet extracted,
    given where a folder goes (``zoo.cli.options.Folder``) or an image (``zoo predict BUNDLE photos.zip``)."""
    name = os.fspath(path).lower()
    return next((k for k in (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".7z", ".rar")
                 if name.endswith(k)), None)


def unexpanded_home(path: str | Path) -> Path | None:
    """``path`` with its leading ``~`` (``~`` or ``~user``) expanded, when the shell left it as it is (quoted:
    ``--data "~/photos"``) and nothing of that name is here; None otherwise (``~draft``: no user of that name)."""
    parts = Path(path).parts
    home = os.path.expanduser(parts[0]) if parts and parts[0].startswith("~") else None
    return None if home is None or home == parts[0] or os.path.lexists(parts[0]) else Path(home, *parts[1:])


def broken_link(path: str | Path) -> str | None:
    """Why ``path`` cannot be created or read, when it is or lies below a symbolic link to nothing (``mkdir`` says
    "File exists"): ``"LINK is a symbolic link to TARGET, which does not exist (...)"``, or one that loops
    (``ln -s loop loop``: "LINK is a symbolic link that loops ..."); None otherwise."""
    path = Path(path)
    # os.path's islink/exists answer False where pathlib's raise (a folder the user may not enter: EACCES on
    # Python < 3.12), so a caller's own message for that failure stands
    link = next((p for p in (path, *path.parents) if os.path.islink(p) and not os.path.exists(p)), None)
    if link is None:
        return None
    try:
        os.stat(link)
    except OSError as e:
        if e.errno == errno.ELOOP:     # (QA: `--data loop` "does not exist")
            return (f"{printable(link)} is a symbolic link that loops (to {printable(os.readlink(link))}, which leads "
                    "back to it)")
    # a chain a -> b -> c: "to b, which does not exist" of a b that `ls` lists (review): each link on the way named
    hops, at = [os.readlink(link)], str(link)
    while len(hops) < 8 and os.path.islink(nxt := os.path.join(os.path.dirname(at), hops[-1])):
        hops, at = hops + [os.readlink(nxt)], nxt
    return (f"{printable(link)} is a symbolic link to {printable(' -> '.join(hops))}, which does not exist (a disk not "
            "mounted, a folder moved?)")


def printable_name(text: str) -> str:
    """A file or class name as text that always encodes: names that are not UTF-8 arrive from the OS as
    surrogate escapes; their bytes are shown as ``\\xNN`` instead of failing to print or write."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # printable to Python, drawn blank: Hangul fillers, Braille


def printable(text: object) -> str:
    """``text`` on one visible line: control and other invisible characters as escapes (``\\n``, ``\\x1b``, ``\\u200b``,
    ``\\u3164``), undecodable file-name bytes as ``\\xNN``; everything printable unchanged (``café 猫 ✓`` stays)."""
    s = printable_name(str(text))
    if s.isprintable() and (s.isascii() or _BLANK.isdisjoint(s)):     # isascii: O(1), most names (a call per image)
        return s
    return "".join(c if c.isprintable() and c not in _BLANK else c.encode("unicode_escape").decode("ascii") for c in s)


def shell_command(*words: object) -> str:
    """The one way a command for the user to paste is written (hints, ``next:`` lines, error advice): each
    word quoted for a POSIX shell where it needs it, so a path with a space, ``$`` or quote stays one word;
    placeholders (``MODEL``, ``DIR``) and plain words stay as they are.  ``shell_command("zoo", "export",
    run)`` -> ``zoo export '/tmp/my runs/a'``."""
    return " ".join(shlex.quote(str(w)) for w in words)


class SafetensorsHeaderError(ValueError):
    """A file is not a complete safetensors file; ``str(err)`` says how (callers add what to do next)."""


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in the file ``path``, or {} when it is missing, unreadable, not UTF-8, not JSON or no
    object (``null``, a list): for pages and cards that leave out what a damaged run file would have shown."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):       # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return {}
    return data if isinstance(data, dict) else {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Raises:
        OSError: it cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_user_text(path: str | Path) -> str:
    """A text file a person wrote (a YAML config): UTF-8, or the UTF-8/16/32 its byte-order mark names (Windows
    Notepad's "Unicode" is UTF-16 with one).

    Raises:
        OSError: it cannot be read. UnicodeDecodeError: it is not text in any of those.
    """
    data = Path(path).read_bytes()
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):        # (UTF-32 LE's mark starts with UTF-16 LE's: it is looked for first)
            return data.decode(codec)
    return data.decode("utf-8")


def load_yaml(text: str, unique_keys: bool = False, as_text: bool = False) -> Any:
    """The one YAML reader: the safe loader with libyaml's C parser when PyYAML has it (the curated registry parses
    in 14 ms instead of 118 ms), plain text resolved by ``finetune.core.yamlschema``'s rule (``1:0:3``, ``010``,
    ``yes`` stay text, as typed after a flag); the same objects and ``yaml.YAMLError``s either way.
    ``unique_keys``: a key given twice in one mapping is a ``yaml.YAMLError`` too (a file people write by hand).
    ``as_text`` (a file of option values: a config, a registry; implies ``unique_keys``): only null is resolved,
    every other plain scalar is its text as written, for the option to read by its kind (``yamlschema.as_int``,
    ``as_float``, ``as_bool``; a text option keeps it: ``out: 1.50`` is ``"1.50"``)."""
    loader = yamlschema.TextLoader if as_text else yamlschema.UniqueKeysLoader if unique_keys else yamlschema.Loader
    return yaml.load(text, Loader=loader)


def yaml_problem(err: Exception) -> str:
    """A YAML error as the end of one line: ``" at line 3, column 5: could not find expected ':'"`` (where, when
    PyYAML knows it, then what; whitespace folded, so a message of several lines stays one). The one wording of a
    config file's and a registry file's syntax errors (callers say which file, and what to do)."""
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{at}: {' '.join((getattr(err, 'problem', None) or str(err)).split())}"


def rewrite_safetensors_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """``data`` (a safetensors file's bytes) with its ``__metadata__`` replaced by ``metadata`` in sorted key
    order; the tensor bytes are untouched. safetensors itself writes the metadata in hash order, which changes
    from process to process: sorted, the same weights and metadata always give the same bytes (the same
    sha256: an exported bundle, a pushed commit).

    Raises:
        SafetensorsHeaderError: ``data`` has no readable safetensors header.
    """
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as err:
        raise SafetensorsHeaderError(f"damaged header ({err})") from None
    header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)          # safetensors keeps the tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check a safetensors header without torch: ``{name: {"dtype", "shape", "data_offsets"}}``,
    plus ``"__metadata__"`` (str -> str) when the file has one.

    The file must be complete: the tensors' byte ranges must end exactly at the end of the file, so a
    truncated download or copy is caught here rather than by whoever maps the tensors.

    Raises:
        FileNotFoundError / OSError: the file cannot be read.
        SafetensorsHeaderError: truncated, a header that is not safetensors JSON, or bad tensor entries;
            the message reads "truncated (...)", "damaged header (...)" or "truncated or damaged (...)".
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        return _checked_header(fh.read(8), fh.read, size)


def parse_safetensors_header(data: bytes) -> dict[str, Any]:
    """:func:`read_safetensors_header` of a whole file's bytes, already read (one read: its digest, header and
    tensors are of the same file, whatever replaces it on disk meanwhile)."""
    return _checked_header(data[:8], lambda n: data[8:8 + n], len(data))


def _checked_header(head: bytes, read: Callable[[int], bytes], size: int) -> dict[str, Any]:
    """The header of a ``size``-byte safetensors file: ``head`` its first 8 bytes, ``read(n)`` the next n."""
    if len(head) < 8:
        raise SafetensorsHeaderError(f"truncated ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_SAFETENSORS_HEADER:     # its first 8 bytes are no header length: say no number
        raise SafetensorsHeaderError("damaged header (its first 8 bytes are no header length)")
    if n > size - 8:
        raise SafetensorsHeaderError(f"truncated or not a safetensors file (a header of {n} bytes in a "
                                     f"{size}-byte file)")
    try:
        header = json.loads(read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsHeaderError("damaged header (not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("damaged header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsHeaderError("damaged header (metadata is not a mapping of strings)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(v, int) for v in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(info.get("shape"), list)
                and isinstance(info.get("dtype"), str)):
            raise SafetensorsHeaderError(f"damaged header (tensor {name!r} has no valid dtype/shape/data_offsets)")
        end = max(end, offsets[1])
    if end != size - 8 - n:
        raise SafetensorsHeaderError(f"truncated or damaged (the header announces {end} bytes of tensors, the "
                                     f"file holds {size - 8 - n})")
    return header


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
