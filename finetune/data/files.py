"""Image files below a folder: walking (ignored names, symlink loops) and cheap validity checks
(headers, JPEG structure, decompression-bomb sizes), without decoding beyond what a check needs."""
from __future__ import annotations

import errno
import os
import re
import stat
import time
import unicodedata
from contextlib import closing
from pathlib import Path
from typing import Iterable, Sequence

import PIL
from PIL import Image, UnidentifiedImageError

from finetune.core.errors import DataError
from finetune.core.threads import ordered_map
from finetune.core.io import OUTPUT_MARKER, UNLISTED_FOLDER, printable, printable_name, read_json_object, write_json
from finetune.data.images import (EMPTY_FILE, IMAGE_FORMATS, jpeg_has_end, jpeg_structure, open_image, pil_warnings,
                                  special_file, unreadable_kind)

# .jfif / .jpe: JPEGs as Windows browsers save them; .ppm / .pgm: read by torchvision's ImageFolder too; .avif
# where this Pillow decodes it (images.IMAGE_FORMATS).
IMAGE_EXTENSIONS = ((".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
                    + ((".avif",) if "AVIF" in IMAGE_FORMATS else ()))
# Debris from archivers, file managers, NAS boxes, notebooks and version control, never data. Every name starting
# with "." is ignored as well; a hidden folder not named here (nor ".Trash*") that holds images is named in the
# scan's warnings (walk_files' ``hidden``): torchvision's ImageFolder would train `.NET/` as a class.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir", "__pycache__", ".ipynb_checkpoints",
                           ".git", ".svn", ".hg", ".dvc", ".venv", ".cache", ".thumbnails", ".picasaoriginals",
                           ".@__thumb", ".Spotlight-V100", ".fseventsd", ".TemporaryItems", ".DocumentRevisions-V100",
                           ".AppleDouble"})
NOT_IMAGE_TYPE = "not an image file type"    # the reason's words for a file not named as an image


# -------------------------------------------------------------------------------------- scanning
def is_ignored(name: str) -> bool:
    # `x.jpg:Zone.Identifier`: Windows' "downloaded from the web" mark, a file of its own once copied into WSL or
    # through Samba, beside every image (QA: each listed as a bad file, and --strict refused the folder)
    return name.startswith(".") or name in IGNORED_NAMES or name.lower().endswith(":zone.identifier")


def _note_hidden(entry: os.DirEntry, hidden: list[tuple[str, int]] | None) -> None:
    """(path, files named as images below it) -> ``hidden`` for a hidden folder ``entry`` (``.NET/``) holding
    some, not debris (:data:`IGNORED_NAMES`, ``.Trash*``) nor a link: only its own files are walked, by name."""
    name = entry.name
    if (hidden is None or not name.startswith(".") or name in IGNORED_NAMES or name.startswith(".Trash")
            or entry.is_symlink() or not is_dir(entry)):
        return
    if count := len(image_files(entry.path)):
        hidden.append((entry.path, count))


def is_zoo_output(folder: str) -> bool:
    """Whether ``folder`` is one a zoo command wrote (a run folder, bundle or report: it holds the marker every
    command writes first, ``.zoo-run.json``): no images of the data, skipped by :func:`walk_files`."""
    return os.path.isfile(os.path.join(folder, OUTPUT_MARKER))


def refuse_zoo_output(folder: str, use: str) -> None:
    """DataError when ``folder``, given where images go (``--data``, ``zoo predict``'s folder), is one a zoo command
    wrote (:func:`is_zoo_output`): its images would be skipped, and it read as an empty folder or no class folders
    (review). ``use``: what the images were for and what to give instead. The marker is named: a folder of the
    user's that a zoo command once wrote into (its output removed, images copied in) reads as the user's again."""
    if is_zoo_output(folder):
        raise DataError(f"{printable_name(folder)} is a folder zoo wrote (a run, bundle or report), not images {use} "
                        f"(it holds {OUTPUT_MARKER}, which zoo writes first into its output; if the folder is yours, "
                        "delete that file)")


def walk_files(top: str, loops: list[str] | None = None, unlisted: list[tuple[str, str]] | None = None,
               hidden: list[tuple[str, int]] | None = None) -> list[str]:
    """Every non-ignored file below ``top`` (symlinks followed), sorted; symlink loops are skipped (and
    appended to ``loops``), folders that cannot be listed (no permission) too, each appended to ``unlisted``
    with the reason. Ignored: hidden names and archiver/NAS debris (``__MACOSX``, Synology's ``@eaDir``
    thumbnails...), at every level (a hidden folder holding images -> ``hidden``, :func:`_note_hidden`), and the
    folders a zoo command wrote (holding its ``.zoo-run.json``: a run folder's curves.png, an eval report's
    confusion.png are no images of the data). The training scan, ``zoo predict`` and ``zoo eval`` all walk folders
    with this.

    Anything that is not a directory counts as a file, so broken and looping file links are reported
    as bad files rather than silently vanishing.
    """
    out: list[str] = []
    visited: set[tuple[int, int]] = set()
    loops = loops if loops is not None else []
    unlisted = unlisted if unlisted is not None else []

    def walk(d: str, real: str) -> None:
        try:
            st = os.stat(d)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:       # reached twice through links: count its files once
            return
        visited.add(key)
        if is_zoo_output(d):    # (QA: an earlier run's PNGs trained as a class)
            return
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:     # a chmod 000 folder: its images were left out without a word (QA)
            unlisted.append((d, f"{UNLISTED_FOLDER} ({e.strerror or e}): the images in it are left out; "
                                "make it readable to use them"))
            return
        for e in entries:
            if is_ignored(e.name):
                _note_hidden(e, hidden)
                continue
            try:
                is_dir = e.is_dir()          # follows symlinks; False for broken or looping links
            except OSError:
                is_dir = False
            if not is_dir:
                out.append(e.path)
                continue
            sub_real = os.path.realpath(e.path)
            # A link to this folder or one of its ancestors would walk forever (or pull in other classes).
            if e.is_symlink() and (sub_real == real or real.startswith(sub_real.rstrip(os.sep) + os.sep)):
                loops.append(e.path)
                continue
            walk(e.path, sub_real)

    walk(top, os.path.realpath(top))
    return sorted(out)


def image_files(top: str, unlisted: list[tuple[str, str]] | None = None,
                others: list[tuple[str, str]] | None = None,
                hidden: list[tuple[str, int]] | None = None) -> list[str]:
    """The files below ``top`` named as images (:data:`IMAGE_EXTENSIONS`, in any case), sorted, walked as
    :func:`walk_files` walks (folders that cannot be listed -> ``unlisted``, hidden folders holding images ->
    ``hidden``): what ``zoo predict`` reads of a folder and ``zoo eval`` of a class folder. The other files go to
    ``others`` as (path, :func:`not_image_type`), where the caller says so, as the training scan does (which keeps
    every file, to say why one is unusable)."""
    found = []
    for p in walk_files(top, unlisted=unlisted, hidden=hidden):
        why = not_image_type(p)
        if why is None:
            found.append(p)
        elif others is not None:
            others.append((p, why))
    return found


def not_image_type(path: str) -> str | None:
    """Why ``path`` is not read as an image by its name (the scan's and zoo eval's words), or None."""
    ext = os.path.splitext(path)[1].lower()
    return None if ext in IMAGE_EXTENSIONS else f"{NOT_IMAGE_TYPE} ({ext or 'no extension'})"


def _check_file(path: str) -> str | None:
    """Cheap validity check of one file; returns why it cannot be used, or None when it looks fine."""
    if os.path.islink(path) and not os.path.exists(path):
        return "broken or looping symbolic link"
    if (why := not_image_type(path)) is not None:
        return why
    kind = special_file(path)
    if kind is not None:            # reading it could wait for good (a pipe); its size reads 0
        return f"{kind}, not an image file"
    try:
        size = os.path.getsize(path)
        if size == 0:
            return EMPTY_FILE
        jpeg_problem = jpeg_structure(path, size)
        if jpeg_problem:
            return jpeg_problem
        with open_image(path) as im:
            w, h = im.size
            fmt = im.format
            if w < 1 or h < 1:
                return f"invalid image size {w}x{h}"
            limit = Image.MAX_IMAGE_PIXELS
            # PIL only warns between 1x and 2x its limit; both are rejected here.
            if limit and w * h > limit:
                return f"too many pixels ({w}x{h}, over the decompression-bomb limit of {limit})"
            im.verify()   # PNG: chunk CRCs to the end of file; others: header sanity
        if fmt in ("JPEG", "MPO") and not jpeg_has_end(path, size):      # MPO: a JPEG carrying more pictures
            # Truncated JPEGs pass the header checks; only a decode proves them (done for suspects only).
            with open_image(path) as im:
                im.load()
    except Image.DecompressionBombError as e:   # over 2x the limit: PIL refuses to open it, naming 2x as its limit
        size = re.search(r"\((\d+) pixels\)", str(e))
        return (f"too many pixels ({size.group(1) + ' pixels, ' if size else ''}over the decompression-bomb limit "
                f"of {Image.MAX_IMAGE_PIXELS})")
    except UnidentifiedImageError:
        return unreadable_kind(path) or "not a readable image (unrecognised or damaged format)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "broken or looping symbolic link"
        return f"cannot read: {e.strerror or e}"
    except Exception as e:  # PIL raises SyntaxError/ValueError/struct.error on malformed headers
        return f"damaged image ({type(e).__name__}: {e})"
    return None


def list_classes(folder: str, hidden: list[tuple[str, int]] | None = None) -> list[str]:
    """The class folders in ``folder`` (sorted); hidden folders holding images -> ``hidden`` (:func:`_note_hidden`)."""
    try:
        entries = os.scandir(folder)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror}; check the path and its permissions") from None
    with entries:
        found = list(entries)
    for e in found:
        _note_hidden(e, hidden)
    return sorted(e.name for e in found if not is_ignored(e.name) and is_dir(e))


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def collect_classes(folder: str, loops: list[str], unlisted: list[tuple[str, str]] | None = None,
                    hidden: list[tuple[str, int]] | None = None) -> dict[str, list[str]]:
    """class name -> files (not yet checked) for ``folder/<class>/**``; folders that cannot be listed ->
    ``unlisted``, hidden folders holding images (skipped: a class ``.NET/``, ``cat/.edits/``) -> ``hidden`` (see
    :func:`walk_files`).

    A class is named by its folder's printable name: a folder name that is not UTF-8 reads ``\\xNN``
    (class names are labels, written into JSON files, checkpoints and bundles).

    Raises:
        DataError: a class folder named with whitespace only (a blank label), or two class folders have the
            same printable name (one named with undecodable bytes, the
            other with the same ``\\xNN`` text), or names that differ only in their Unicode form (``café``
            composed and decomposed: one name to the eye, to macOS and in every label printed) or in
            whitespace at an end (``cat`` and ``cat ``): one :func:`class_key`.
    """
    classes: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    reals: dict[str, str] = {}
    for c in list_classes(folder, hidden):
        name = printable_name(c)
        if not class_key(name):     # (audit: " " trained as a class, blank in every line that named it)
            raise DataError(f"class folder {name!r} in {printable_name(folder)} is named with whitespace only, and "
                            "would print blank as a class in every line; rename it")
        twin = seen.get(class_key(name))
        if twin is not None:
            if twin.strip() != twin or name.strip() != name:    # (QA: two classes, printed almost alike)
                raise DataError(f"two class folders in {printable_name(folder)} are named {twin!r} and {name!r}, one "
                                "name but for whitespace at an end, and would print alike as two classes; rename "
                                "one, or move the images of one into the other")
            why = ("one of them has a name that is not UTF-8" if twin == name else
                   "written with other Unicode characters: composed and decomposed accents, as macOS and Linux "
                   "tools write them")
            raise DataError(f"two class folders in {printable_name(folder)} read {name} ({why}); rename one, or "
                            "move the images of one into the other")
        seen[class_key(name)] = name
        _refuse_shared_folder(folder, c, reals)
        classes[name] = walk_files(os.path.join(folder, c), loops, unlisted, hidden)
    return dict(sorted(classes.items()))


def _refuse_shared_folder(folder: str, c: str, reals: dict[str, str]) -> None:
    """DataError when class folder ``c`` is, through a symbolic link, another class folder or inside one (or
    holds one): its images would be in both classes, and trained as both without a word (QA). ``reals``:
    the real paths of the class folders so far, and of their parent folders (``"^" + path``)."""
    real = os.path.realpath(os.path.join(folder, c))
    parents = [os.path.dirname(real)]
    while os.path.dirname(parents[-1]) != parents[-1]:
        parents.append(os.path.dirname(parents[-1]))
    other = reals.get(real) or reals.get("^" + real) or next((reals[p] for p in parents if p in reals), None)
    if other is not None:
        link = c if os.path.islink(os.path.join(folder, c)) else other
        raise DataError(f"class folders {printable_name(other)} and {printable_name(c)} in "
                        f"{printable_name(folder)} hold the same images ({printable_name(link)} leads to "
                        f"{printable_name(os.path.realpath(os.path.join(folder, link)))} through a symbolic "
                        "link), which would be trained as both classes; remove the link, or give each class "
                        "a folder of its own")
    reals[real] = c
    reals.update(("^" + p, c) for p in parents)


def name_key(name: str) -> str:
    """What makes two file names (or relative paths) the same name: their Unicode NFC form (``cafe\\u0301`` is
    ``caf\\xe9``, as macOS file systems and every reader take it). The seeded split hashes each path by it."""
    return unicodedata.normalize("NFC", name)


def class_key(name: str) -> str:
    """What makes two class names the same name: their :func:`name_key`, less whitespace at either end (``cat``
    and ``cat `` print alike in every label). The scan refuses two class folders with one key; ``zoo eval``
    matches a class folder to a model's label by it."""
    return name_key(name).strip()


def case_twin(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that ``name`` differs from in letter case alone (``cat`` of ``Cat``), or None: class
    names are case-sensitive (two classes on Linux, as torchvision's ImageFolder reads them), so a val/ class
    or a folder given to ``zoo eval`` named in another case than its training folder is another class; the
    messages that leave it out name its twin (dataset-shapes audit: they said "no training images")."""
    folded = class_key(name).casefold()
    return next((n for n in names if class_key(n) != class_key(name) and class_key(n).casefold() == folded), None)


def path_key(path: str) -> str:
    """What makes two paths the same path: each of their names by :func:`class_key` (the class folder ``cat `` is
    the class ``cat``, and its files the same files). A split file and an exclude list match files by it."""
    return "/".join(class_key(part) for part in path.replace(os.sep, "/").split("/"))


def listed_names(listed: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """name -> the entry of ``listed`` it is, for the ``names`` listed: an entry that is a name exactly stands for
    that name only; another stands for the names that print as it (exclude.txt writes a newline or tab in a name
    as ``\\n``, ``\\t``). So a file named ``a\\nb`` (a backslash) is not left out with its twin named with a
    newline (review: listing either excluded both). An exclusion list and a split file's accounting match by it."""
    names = list(names)
    wanted = set(listed)
    exact = wanted & set(names)
    escaped = {printable(w): w for w in wanted - exact}
    return {n: n if n in exact else escaped[printable(n)] for n in names if n in exact or printable(n) in escaped}


_CHECK_RUN = 64    # files per thread task: a future per file cost more than a check on a warm cache
CHECK_THREADS = 8  # threads of the file checks (the doctor's file pass takes as many at most)


# What a memo of file checks (check_files' ``memo``) was made with: a memo of another format, Pillow or
# decompression-bomb limit is not used. Bump the format when _check_file's verdicts change.
_MEMO_FORMAT = 4     # 3: only IMAGE_FORMATS are opened (an EPS named .jpg was kept); 4: an MPO cut short is found
# A file changed less than this before a scan (or dated in the future) is not remembered: a same-size rewrite
# within one tick of a coarse clock (FAT, ext3, HFS+, some NFS/SMB servers) would keep its times (git's rule).
_MEMO_RACY_NS = 2_000_000_000


def check_files(files: Sequence[str], memo: str | Path | None = None) -> list[str | None]:
    """Why each file cannot be used (None: it looks fine), by :func:`_check_file`.

    ``memo``: a JSON file that remembers the files found fine, each with its size, modification and change
    times and inode: such a file unchanged since is not opened again (a later scan of 12,288 JPEGs: a stat
    each instead of three opens), a changed one (a write moves its change time, whatever mtime a tool sets
    back) is checked again, and so is every file found unusable (a read error may pass; the reason is said
    again). It is rewritten when anything changed; one that cannot be read or written is ignored. Not on
    Windows, where a file's ctime is its creation time."""
    if memo is None or os.name == "nt":
        return _check_all(files)
    started = time.time_ns()
    keys = [_stat_key(f) for f in files]
    known = _read_memo(memo)
    reasons: list[str | None] = [None] * len(files)
    todo = [i for i, (f, k) in enumerate(zip(files, keys)) if k is None or known.get(f) != k]
    for i, reason in zip(todo, _check_all([files[i] for i in todo])):
        reasons[i] = reason
    entries = {f: k for f, k, r in zip(files, keys, reasons)
               if k is not None and r is None and started - _MEMO_RACY_NS > max(k[1], k[2])}
    if entries != known:
        _write_memo(memo, entries)
    else:
        try:
            os.utime(memo)       # used: its time says so (zoo removes memos of folders not scanned for a month)
        except OSError:
            pass
    return reasons


def _stat_key(path: str) -> list[int] | None:
    """What a memo keys a file's verdict on: size, mtime, ctime (no tool sets it back) and inode; None for
    what is not a regular file (a broken link, a pipe), always checked."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] if stat.S_ISREG(st.st_mode) else None


def _memo_header() -> dict:
    return {"format": _MEMO_FORMAT, "pillow": PIL.__version__, "max_pixels": Image.MAX_IMAGE_PIXELS}


def _read_memo(memo: str | Path) -> dict[str, list]:
    doc = read_json_object(memo)      # {} when there is none yet or it is damaged
    files = doc.get("files") if doc.get("made_with") == _memo_header() else None    # another layout
    return files if isinstance(files, dict) else {}


def _write_memo(memo: str | Path, entries: dict[str, list]) -> None:
    try:
        Path(memo).parent.mkdir(parents=True, exist_ok=True)
        write_json(memo, {"made_with": _memo_header(), "files": entries}, separators=(",", ":"))
    except OSError:      # a read-only or full cache folder: the next scan checks the files again
        pass


def _check_all(files: Sequence[str]) -> list[str | None]:
    # The filter is set once here, not per file: catch_warnings is process-global and not thread-safe.
    with pil_warnings(bombs="ignore"):   # _check_file reports these
        if len(files) < 64:
            return [_check_file(f) for f in files]
        # Header reads wait on the disk (a cold cache, a network drive); threads overlap the waits. Each
        # task checks a run of files: a future per file cost more than the check on a warm cache. A Ctrl-C
        # drops the runs not started.
        runs = (files[i:i + _CHECK_RUN] for i in range(0, len(files), _CHECK_RUN))
        with closing(ordered_map(_check_run, runs, CHECK_THREADS, 2 * CHECK_THREADS, "zoo-scan-files")) as done:
            return [reason for run in done for reason in run]


def _check_run(files: Sequence[str]) -> list[str | None]:
    return [_check_file(f) for f in files]
