"""Decoding one image file: PIL (RGB, EXIF-upright, first frame, draft() for big JPEGs) or
torchvision's decode_jpeg to a uint8 tensor for the files it decodes exactly."""
from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from finetune.core.errors import DataError
from finetune.core.io import archive_kind, broken_link, printable_name

# Why a file of no bytes is skipped: the scan (bad_files.txt), the training loaders, zoo predict / eval and
# zoo serve's uploads all say it in these words.
EMPTY_FILE = "empty file (0 bytes)"
# Pillow's formats of the files training reads (files.IMAGE_EXTENSIONS): the only decoders any reader uses, so
# a file whose name lies (an EPS named .jpg, handed to Ghostscript by Pillow) is refused, not opened (QA).
# A phone's multi-picture JPEG opens through the JPEG decoder (as format "MPO"). AVIF where this Pillow decodes
# it (11.2+ wheels): browsers save it under .jpg names too, and web-scraped folders hold such files.
try:
    from PIL import AvifImagePlugin as _avif
    _AVIF: tuple[str, ...] = ("AVIF",) if _avif.SUPPORTED else ()
except ImportError:       # an older Pillow: no AVIF decoder
    _AVIF = ()
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM") + _AVIF


def open_image(fp) -> Image.Image:
    """``Image.open`` limited to :data:`IMAGE_FORMATS` (UnidentifiedImageError for any other content); every
    reader of images (scan, loaders, predict, eval, doctor, serve) opens them through it."""
    return Image.open(fp, formats=IMAGE_FORMATS)

# -------------------------------------------------------------------------------------- decoding
@contextmanager
def pil_warnings(bombs: str = "error") -> Iterator[None]:
    """``warnings.catch_warnings`` for reading image files, the one set of PIL filters every reader uses.

    PIL's decompression-bomb warning (between 1x and 2x its pixel limit) becomes ``bombs``: "error" (raised
    as ``Image.DecompressionBombWarning``) or "ignore" (the caller checks the size itself). PIL's notes on
    damaged metadata (a camera file whose EXIF block breaks off: "Corrupt EXIF data. Expecting to read 12
    bytes but only got 10.", printed with PIL's own file and line) are silenced: PIL goes on and the pixels
    are used as stored (:func:`upright_rgb`), so they only alarmed. Not thread-safe (``catch_warnings``):
    enter it once, around the threads.
    """
    with warnings.catch_warnings():
        warnings.simplefilter(bombs, Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
        yield


_SHARED = threading.Lock()
_shared: list = []          # [the ExitStack holding pil_warnings() for shared_pil_warnings' holders, their count]


@contextmanager
def shared_pil_warnings() -> Iterator[None]:
    """:func:`pil_warnings` held by threads that start and stop in any order (zoo serve's background servers, a thread
    each): the first to enter sets the filters, the last to leave restores the process's. Each thread's own
    ``catch_warnings`` restored on leaving the list it had found, so of two servers stopped in the order they started,
    the first took the filters from the second, still serving, and the second left them in the process for good."""
    with _SHARED:
        if not _shared:
            held = ExitStack()
            held.enter_context(pil_warnings())
            _shared[:] = [held, 0]
        _shared[1] += 1
    try:
        yield
    finally:
        with _SHARED:
            _shared[1] -= 1
            if not _shared[1]:
                _shared.pop(0).close()
                _shared.clear()

# What decoding a file gives (to_rgb, decode_opened) in this version: raised when a change gives some files other
# pixels, so that features cached from their old pixels (finetune.tools.features' keys) are computed again.
# 2: a PNG's tRNS colour key, an alpha channel that hides every pixel, a multi-picture JPEG's draft (helper-109).
DECODE_REVISION = 2


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, 16/32-bit scaled (not clipped). What
    training sees, so every other reader (zoo serve's uploads, PIL images given to zoo.load_bundle) uses it
    too: ``Image.convert("RGB")`` clips 16-bit values and turns transparent pixels black."""
    mode = im.mode
    # A PNG's tRNS colour key (grey, RGB, 16-bit grey: optipng's form of an RGBA whose alpha is all or nothing): the
    # pixels of that one colour are transparent, so on white as an alpha channel's are (they kept the stored colour).
    key = im.info.get("transparency") if mode != "P" else None
    if mode == "RGB" and key is None:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        raw = np.asarray(im)
        a = raw.astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0                          # 65535 -> 255 exactly
        elif mode == "F" and a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        elif a.size and (a.max() > 255 or a.min() < 0):
            hi = 65535.0 if a.min() >= 0 and a.max() <= 65535 else a.max()
            lo = 0.0 if hi == 65535.0 else a.min()
            a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
        hidden = raw == key if isinstance(key, int) else None
        if hidden is not None and not hidden.all():    # (a key on every pixel: unused, as an all-hiding alpha below)
            a[hidden] = 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        return im.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif key is not None and mode in ("1", "L", "RGB"):
        try:
            im = im.convert("RGBA")            # Pillow turns the key into an alpha channel
        except (TypeError, ValueError):        # a key Pillow cannot use: the pixels as stored, as before
            return im.convert("RGB")
    if im.mode == "RGBA":
        alpha = im.getchannel("A")
        if alpha.getextrema()[1] == 0:     # hides every pixel: an alpha byte the writer left unused (a 32-bit BMP's,
            return im.convert("RGB")       # shown opaque by browsers and Windows), not a blank image
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=alpha)
        return background
    return im.convert("RGB")                       # L, 1, CMYK, YCbCr, LAB, HSV


def upright_rgb(im: Image.Image) -> Image.Image:
    """A loaded image as training sees it: turned upright by its EXIF orientation, then :func:`to_rgb`. A new
    image (safe to use after ``im``'s file closes); malformed EXIF leaves the pixels as stored."""
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:   # malformed EXIF: the pixels are fine, use them as stored
        upright = None
    return to_rgb(upright if upright is not None else im.copy())


def decode_opened(im: Image.Image, min_size: int | None = None) -> Image.Image:
    """An opened image's pixels as training reads them (:func:`load_image`; zoo serve's uploads): the first
    frame, a big JPEG at a reduced scale (PIL ``draft``) while both sides stay at least ``min_size``, upright
    RGB. Raises what PIL raises for a damaged file."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if min_size and im.format in ("JPEG", "MPO"):       # MPO: a JPEG carrying more pictures (a phone's gain map)
        im.draft("RGB", (int(min_size), int(min_size)))
    im.load()
    return upright_rgb(im)


def named_stream(path: str | Path) -> bool:
    """Whether ``path`` lies where the streams a user names on purpose live (``zoo predict BUNDLE -`` reads
    /dev/stdin, ``<(curl ...)`` is /dev/fd/N): under /dev or /proc, but not /dev/shm, a folder of files like any
    other (a data set copied to RAM). Such a path is read, and its read waits for its writer."""
    where = os.path.abspath(os.fsdecode(path))
    return where.startswith(("/dev/", "/proc/")) and not where.startswith("/dev/shm/")


def special_file(path: str | Path) -> str | None:
    """What ``path`` is when it is a named pipe, a socket or a device rather than a file (opening a pipe waits for
    a writer: zoo predict of a folder holding one hung for good), else None; the streams a user names on purpose
    (:func:`named_stream`) are read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None             # missing, a broken link: the reader says so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or named_stream(path):
        return None
    return "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"


def _refuse_special(path: str | Path) -> None:
    kind = special_file(path)
    if kind is not None:
        raise DataError(f"{printable_name(str(path))} is {kind}, not an image file; remove it from the folder")


def verified(im: Image.Image, fp) -> Image.Image:
    """``im``, just opened from ``fp`` (a path or a seekable file), ready to decode once a PNG's chunk checksums
    are found right (Pillow's ``verify``, the scan's check in ``files.check_files``): a PNG that fails them is
    damaged to libpng and browsers, and Pillow's decode alone reads its pixels without a word (QA: eval and
    predict used one the scan had skipped). Raises SyntaxError ("broken PNG file ...") for a wrong one."""
    if im.format != "PNG":
        return im
    im.verify()          # reads the chunks to the end; the image cannot be decoded after it
    if hasattr(fp, "seek"):
        fp.seek(0)
    return open_image(fp)


def _rereadable(path: str | Path) -> str | Path | io.BytesIO:
    """``path``, or for a stream (a pipe: ``curl ... | zoo predict BUNDLE -``) its bytes in memory: :func:`verified`
    reads a PNG twice, and a pipe's bytes are spent by the first read (review: a piped PNG was "not a readable
    image")."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return path
    except OSError:         # missing, unreadable: open_image says which
        return path
    with open(path, "rb") as fh:
        return io.BytesIO(fh.read())


def load_image(path: str | Path, min_size: int | None = None, checked: bool = False) -> Image.Image:
    """Decode an image file to an upright 8-bit RGB PIL image (first frame of animations).

    Args:
        path: the image file.
        min_size: big JPEGs are decoded at a reduced scale (PIL ``draft``) while both sides stay at
            least this large; None decodes at full size.
        checked: the file passed the scan's check (``files.check_files``, a training set's loaders): a
            PNG's checksums are not read again each epoch (:func:`verified`, done otherwise).

    Raises:
        DataError: the file cannot be read or decoded, or exceeds PIL's decompression-bomb limit.
    """
    _refuse_special(path)
    try:
        with pil_warnings():
            source = path if checked else _rereadable(path)
            with open_image(source) as im:
                if checked:
                    return decode_opened(im, min_size)
                with verified(im, source) as ready:
                    return decode_opened(ready, min_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{printable_name(str(path))} has too many pixels (over PIL's decompression-bomb limit); "
                        "resize or remove it") from None
    except UnidentifiedImageError:
        what = f"an {EMPTY_FILE}" if _is_empty(path) else (unreadable_kind(path) or "not a readable image")
        raise DataError(f"{printable_name(str(path))} is {what}; fix or remove it") from None
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as e:
        raise DataError(f"cannot decode {printable_name(str(path))}: {e}; fix or remove the file") from None
    except Exception as e:  # malformed files raise SyntaxError / ValueError / struct.error inside PIL
        raise DataError(f"cannot decode {printable_name(str(path))} ({type(e).__name__}: {e}); "
                        "fix or remove the file") from None


_JPEG_TAIL = 64 * 1024      # bytes searched for the JPEG end marker (some cameras append data after it)
# JPEG markers without a length field: TEM and RST0-7 (SOI and EOI are handled on their own).
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def jpeg_structure(path: str, size: int) -> str | None:
    """For a file that starts like a JPEG (SOI), why its headers cannot lead to image data, else None.

    Walks the marker segments up to the first scan (SOS) without decoding anything. Pillow's own header
    parser changed between versions in what it accepts (a file cut inside its Huffman tables: refused by
    Pillow 12, opened by 13), so this check, not Pillow's, decides whether such a file is kept.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None                     # not a JPEG: Pillow's checks decide
        pos = 2
        while True:
            fh.seek(pos)
            head = fh.read(4)
            if len(head) < 2 or head[0] != 0xFF:
                return "damaged JPEG (its headers break off before any image data)"
            marker = head[1]
            if marker == 0xFF:              # fill byte before a marker
                pos += 1
            elif marker in _JPEG_STANDALONE:
                pos += 2
            elif marker == 0xD9:
                return "damaged JPEG (it ends before any image data)"
            elif len(head) < 4 or int.from_bytes(head[2:4], "big") < 2:
                return "damaged JPEG (its headers break off before any image data)"
            else:
                pos += 2 + int.from_bytes(head[2:4], "big")
                if marker == 0xDA:          # start of scan: image data follows its header
                    return None if pos < size else "damaged JPEG (no image data after its headers)"
                if pos >= size:
                    return "damaged JPEG (its headers break off before any image data)"


def jpeg_has_end(path: str, size: int) -> bool:
    """Whether a JPEG's end marker (EOI) is in its last bytes (some cameras append data after it)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 16))          # the usual case, found without reading the whole tail
        if b"\xff\xd9" in fh.read():
            return True
        fh.seek(max(0, size - _JPEG_TAIL))
        return b"\xff\xd9" in fh.read()


# ISO media brands (bytes 8-12 after "ftyp") of the photo formats Pillow may lack: a phone's HEIC, a browser's AVIF.
_ISO_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF",
               b"msf1": "HEIF"}


def unreadable_kind(path: str | Path) -> str | None:
    """What a file Pillow identified no image in is, when its header names a photo format zoo cannot decode
    here (an AVIF without Pillow's AVIF decoder, a HEIC under a .jpg name), or its name an archive (``zoo predict
    BUNDLE photos.zip``: the rule ``--data photos.zip`` is refused by), with the way on; None otherwise."""
    if (archive := archive_kind(path)) is not None:
        return f"a {archive} archive, not an image (extract it, then give the image folder it holds)"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):     # a pipe's bytes are spent, and reading could wait
            return None
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return None
    fmt = _ISO_BRANDS.get(head[8:12]) if head[4:8] == b"ftyp" else None
    if fmt is None or fmt in IMAGE_FORMATS:
        return None
    fix = "install Pillow 11.2 or newer, or convert it to JPEG or PNG" if fmt == "AVIF" else "convert it to JPEG or PNG"
    return f"an {fmt} image, which this installation cannot decode ({fix})"


def _is_empty(path: str | Path) -> bool:
    """A regular file of no bytes. A stream (``zoo predict BUNDLE -`` on a pipe) reports size 0 whatever it
    carried, and its bytes are spent by then: not said to be empty."""
    try:
        st = os.stat(path)
    except OSError:         # no size to ask
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


_SOI = b"\xff\xd8\xff"
_ORIENTATION = 0x0112


def device_decodable(data: bytes, min_size: int | None = None) -> bool:
    """True for a JPEG that ``torchvision.io.decode_jpeg`` turns into the same upright RGB image as
    ``load_image``: baseline (progressive JPEGs take nvJPEG's slow host path), RGB or greyscale (not
    CMYK/YCCK), no EXIF rotation, within PIL's decompression-bomb limit, and, given ``min_size``, not so
    large that ``load_image`` would decode it at a reduced scale (PIL ``draft``: cheaper than a full-size
    decode)."""
    if not data.startswith(_SOI):
        return False
    try:
        with pil_warnings():
            with open_image(io.BytesIO(data)) as im:     # header only: no pixel is decoded here
                if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.info.get("progressive"):
                    return False
                if min_size and min(im.size) >= 2 * int(min_size):
                    return False
                return int(im.getexif().get(_ORIENTATION, 1) or 1) == 1
    except Exception:        # unreadable header, bomb, odd EXIF: load_image decides (and reports)
        return False


def _missing(path: str | Path) -> DataError:
    """A file that cannot be found (every reader of image files says it this way): one listed by the scan
    and moved or deleted since, or a symbolic link to nothing (a folder given to zoo predict or eval)."""
    if (link := broken_link(path)) is not None:
        return DataError(f"{link}; fix or remove it")
    return DataError(f"{printable_name(str(path))} is missing: moved or deleted since the scan")


def read_image_bytes(path: str | Path) -> bytes:
    """The file's bytes. Raises DataError (one line, what to do) when it cannot be read."""
    _refuse_special(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as e:
        raise DataError(f"cannot read {printable_name(str(path))}: {e.strerror or e}; fix or remove the file") from None


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image (any mode: :func:`to_rgb`) -> a writable uint8 tensor (3, H, W)."""
    rgb = to_rgb(im)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_image_tensor(path: str | Path, min_size: int | None = None, data: bytes | None = None,
                      plain: bool | None = None, checked: bool = False) -> torch.Tensor:
    """``load_image`` as a uint8 tensor (3, H, W): plain JPEGs (:func:`device_decodable`) are decoded by
    ``torchvision.io.decode_jpeg`` (libjpeg-turbo, faster than PIL's decode), everything else by
    ``load_image``. ``data``: the file's bytes, and ``plain``: ``device_decodable(data, min_size)``, when the
    caller has them already; ``checked`` as ``load_image``'s. Raises DataError like ``load_image``."""
    data = read_image_bytes(path) if data is None else data
    if device_decodable(data, min_size) if plain is None else plain:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass                  # let PIL decide: it reads some files libjpeg's strict mode rejects
    return to_uint8_tensor(load_image(path, min_size, checked))


