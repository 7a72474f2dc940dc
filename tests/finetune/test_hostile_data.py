"""Hostile image folders at the data layer (issue 8): broken, odd and misleading files.

``build_hostile_folder`` is reused by the CLI tests that run ``zoo finetune`` on the same cases.
"""
from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import (
    ImageDataset,
    ImageSet,
    build_transform,
    collate_skip_none,
    device_decodable,
    load_image,
    scan_folder,
    write_scan,
)
from finetune.core.errors import DataError
from tests.conftest import fifo_with_a_late_writer, make_image, make_image_folder

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _write_huge_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit all-black PNG of width x height: tiny on disk, over PIL's decompression-bomb limit."""
    row = b"\x00" + bytes((width + 7) // 8)       # filter byte + packed pixels
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _noise_jpeg_bytes(size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_hostile_folder(root: Path) -> dict:
    """Write every hostile case of issue 8 under ``root``.

    Returns a dict:
        data: a trainable split-layout folder (train/{cat,dog,fox,empty}, val/{cat,dog}) whose cat class
            holds broken files, odd-but-valid images, debris, odd names and symlink loops;
        classes / train_counts / val_counts: what a scan must find in ``data``;
        bad: {path relative to data: a word its reason contains} for the files that must be skipped;
        good: {case: Path} of the odd-but-valid images (cmyk, gray16, palette_alpha, gif, exif6, ...);
        ignored: debris paths that must not appear anywhere (hidden files, __MACOSX, .DS_Store...);
        warnings: substrings the scan warnings must contain;
        fatal: {case: folder} that must each fail with one DataError (one_class, no_images,
            val_class_not_in_train, missing).
    """
    root = Path(root)
    data = root / "data"
    rng = random.Random(0)
    cat, dog, fox = (data / "train" / c for c in ("cat", "dog", "fox"))
    for i in range(6):
        make_image(cat / f"good_{i:03d}.png", 0, rng=rng)
        make_image(dog / f"good_{i:03d}.png", 1, rng=rng)
        make_image(fox / f"good_{i:03d}.png", 2, rng=rng)
    for i in range(3):
        make_image(data / "val" / "cat" / f"v{i}.png", 0, rng=rng)
        make_image(data / "val" / "dog" / f"v{i}.png", 1, rng=rng)
    (data / "train" / "empty").mkdir()                 # an empty class folder (debris only)
    (data / "train" / "empty" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    good: dict[str, Path] = {}
    good["tiny_1x1"] = cat / "tiny_1x1.png"
    Image.new("RGB", (1, 1), RED).save(good["tiny_1x1"])
    good["wide_20000x10"] = cat / "wide_20000x10.png"
    Image.new("RGB", (20000, 10), BLUE).save(good["wide_20000x10"])
    good["cmyk"] = cat / "cmyk.jpg"
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(good["cmyk"], quality=95)     # red in CMYK
    good["gray16"] = cat / "gray16.png"
    a = np.full((12, 12), 40000, dtype=np.uint16)
    a[:, 6:] = 1000
    Image.fromarray(a).save(good["gray16"])                                         # mode I;16
    good["palette_alpha"] = cat / "palette_alpha.png"
    p = Image.new("P", (12, 12), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    p.paste(1, (6, 0, 12, 12))
    p.save(good["palette_alpha"], transparency=0)                                   # left half transparent
    good["gif"] = cat / "animated.gif"
    Image.new("RGB", (16, 16), RED).save(good["gif"], save_all=True, duration=100, loop=0,
                                         append_images=[Image.new("RGB", (16, 16), BLUE)])
    good["exif6"] = cat / "exif_rotated.jpg"
    land = Image.new("RGB", (60, 30), BLUE)                                          # stored landscape
    land.paste(RED, (0, 0, 12, 12))                                                  # marked top-left
    exif = Image.Exif()
    exif[0x0112] = 6                                                                 # display rotated 90 CW
    land.save(good["exif6"], quality=95, exif=exif.tobytes())
    good["spaces"] = cat / "my  cat photo (1).png"
    make_image(good["spaces"], 0, rng=rng)
    non_utf8 = os.path.join(os.fsencode(cat), b"caf\xe9 \xff photo.png")
    good["non_utf8"] = Path(os.fsdecode(non_utf8))
    make_image(good["non_utf8"], 0, rng=rng)
    nested = os.path.join(os.fsencode(cat), b"sub \xfe dir", b"inner.png")
    good["nested_non_utf8_dir"] = Path(os.fsdecode(nested))
    make_image(good["nested_non_utf8_dir"], 0, rng=rng)

    bad: dict[str, str] = {}
    jpeg = _noise_jpeg_bytes()
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad["train/cat/truncated.jpg"] = "truncated"
    (cat / "zero.jpg").write_bytes(b"")
    bad["train/cat/zero.jpg"] = "empty"
    (cat / "text.jpg").write_text("this is not a picture\n")
    bad["train/cat/text.jpg"] = "not a readable image"
    _write_huge_png(cat / "bomb.png", 20000, 20000)    # 400 Mpx, about 60 kB on disk
    bad["train/cat/bomb.png"] = "decompression-bomb"
    (cat / "notes.txt").write_text("labels by hand\n")
    bad["train/cat/notes.txt"] = "not an image file type"
    os.symlink("l2.jpg", cat / "l1.jpg")                # a file-level symlink loop
    os.symlink("l1.jpg", cat / "l2.jpg")
    bad["train/cat/l1.jpg"] = bad["train/cat/l2.jpg"] = "symbolic link"
    os.symlink("missing.png", cat / "gone.png")
    bad["train/cat/gone.png"] = "symbolic link"

    os.symlink(".", cat / "loop_self")                  # folder-level loops
    os.symlink("..", cat / "loop_up")
    ignored = [cat / ".hidden.png", cat / "._good_000.png", cat / ".DS_Store", cat / "Thumbs.db",
               data / "__MACOSX" / "train" / "cat" / "._good_000.png", cat / "__MACOSX" / "._x.png"]
    for path in ignored:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    make_image(cat / ".hidden.png", 0, rng=rng)         # a real image, but hidden: still ignored

    fatal = {"one_class": root / "one_class", "no_images": root / "no_images",
             "val_class_not_in_train": root / "val_not_in_train", "missing": root / "does_not_exist"}
    for i in range(3):
        make_image(fatal["one_class"] / "cat" / f"{i}.png", 0)
    (fatal["no_images"] / "a").mkdir(parents=True)
    (fatal["no_images"] / "a" / ".DS_Store").write_bytes(b"Bud1")
    (fatal["no_images"] / "b" / "__MACOSX").mkdir(parents=True)
    (fatal["no_images"] / "readme.md").write_text("nothing here\n")
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "dog", "bird"))):
        for ci, c in enumerate(classes):
            for i in range(2):
                make_image(fatal["val_class_not_in_train"] / split / c / f"{i}.png", ci)

    return {
        "data": data,
        "classes": ["cat", "dog", "fox"],
        "train_counts": {"cat": 6 + len(good), "dog": 6, "fox": 6},
        "val_counts": {"cat": 3, "dog": 3, "fox": 0},
        "bad": bad,
        "good": good,
        "ignored": ignored,
        "warnings": ["empty class folder", "no validation images", "symbolic-link loop", "bad_files.txt"],
        "fatal": fatal,
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    return build_hostile_folder(tmp_path_factory.mktemp("hostile"))


EVAL_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875,
               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


# ---------------------------------------------------------------------------------------- the scan
def test_scan_skips_bad_files_and_reports(hostile):
    report = scan_folder(hostile["data"])
    assert report.layout == "split" and report.classes == hostile["classes"]
    assert report.counts()["train"] == hostile["train_counts"]
    assert report.counts()["val"] == hostile["val_counts"]
    reasons = {report.relpath(p): r for p, r in report.bad_files}
    assert set(reasons) == set(hostile["bad"])
    for rel, word in hostile["bad"].items():
        assert word in reasons[rel], (rel, reasons[rel])
    for word in hostile["warnings"]:
        assert any(word in w for w in report.warnings), (word, report.warnings)
    used = {p for s in (report.train, report.val) for p, _ in s.items}
    assert {str(p) for p in hostile["good"].values()} <= used
    assert not any("__MACOSX" in p or "/." in p for p in used)
    assert not any("loop_" in p for p in used)      # the loops were not followed into duplicates
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")   # odd names stay encodable


def test_write_scan_with_odd_names(hostile, tmp_path):
    report = scan_folder(hostile["data"])
    write_scan(report, tmp_path / "run")
    lines = (tmp_path / "run" / "bad_files.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(hostile["bad"])
    scan = json.loads((tmp_path / "run" / "scan.json").read_text(encoding="utf-8"))
    assert scan["counts"]["train"] == hostile["train_counts"]
    again = scan_folder(hostile["data"], split_file=tmp_path / "run" / "split.json")
    assert again.fingerprint() == report.fingerprint()          # non-UTF-8 names survive split.json
    assert not any("changed since" in w for w in again.warnings)


def test_a_bad_file_named_with_a_newline_or_a_tab_is_one_line_of_bad_files_txt(tmp_path):
    """QA (h72): bad_files.txt is one ``path<TAB>reason`` per line, and a bad file named ``bad<newline>name.png``
    took two lines (``cat/bad``, then ``name.png<TAB>reason``), one named with a tab three columns; the names
    are written escaped now, as the console prints them."""
    data = make_image_folder(tmp_path / "d", per_class=3)
    for name in ("bad\nname.png", "bad\ttab.png"):
        (data / "cat" / name).write_bytes(b"junk")
    write_scan(scan_folder(data), tmp_path / "run")
    lines = (tmp_path / "run" / "bad_files.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == ["cat/bad\\nname.png", "cat/bad\\ttab.png"]
    assert all(len(line.split("\t")) == 2 for line in lines)


def test_strict_makes_bad_files_fatal(hostile):
    with pytest.raises(DataError, match="unreadable files.*--strict"):
        scan_folder(hostile["data"], strict=True)


@pytest.mark.parametrize("case,match", [("one_class", "only 1 class"), ("no_images", "no images found"),
                                        ("val_class_not_in_train", "bird"), ("missing", "does not exist")])
def test_fatal_folders(hostile, case, match):
    with pytest.raises(DataError, match=match) as err:
        scan_folder(hostile["fatal"][case])
    assert "\n" not in str(err.value)


def test_images_without_class_folders(tmp_path):
    for i in range(3):
        make_image(tmp_path / "d" / f"{i}.png", i)
    with pytest.raises(DataError, match="not in class folders"):
        scan_folder(tmp_path / "d")


# ------------------------------------------------------------------------------------- decoding
def test_every_usable_image_goes_through_both_transforms(hostile):
    report = scan_folder(hostile["data"])
    for train in (True, False):
        ds = ImageDataset(report.train, build_transform(EVAL_CONFIG, train=train))
        for i in range(len(ds)):
            x, label = ds[i]
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
        assert ds.failures() == []


def test_truncated_jpeg_is_caught_per_image(hostile):
    truncated = str(hostile["data"] / "train" / "cat" / "truncated.jpg")
    good = str(hostile["good"]["cmyk"])
    ds = ImageDataset(ImageSet([(good, 0), (truncated, 0), (good, 0)], ["cat"]),
                      build_transform(EVAL_CONFIG, train=False))
    batch = [ds[i] for i in range(3)]
    assert batch[1] is None
    images, labels = collate_skip_none(batch)
    assert images.shape == (2, 3, 32, 32)
    (path, reason), = ds.failures()
    assert path == truncated and reason      # Pillow's wording of the reason is its own


def test_decoded_colours_and_orientation(hostile):
    g = hostile["good"]
    assert load_image(g["cmyk"]).getpixel((12, 12)) == pytest.approx(RED, abs=8)
    gray = load_image(g["gray16"])
    assert gray.getpixel((2, 2)) == (156, 156, 156)        # 40000 / 257, not clipped to 255
    assert gray.getpixel((9, 2)) == (4, 4, 4)              # 1000 / 257
    pal = load_image(g["palette_alpha"])
    assert pal.getpixel((2, 2)) == (255, 255, 255)         # transparent -> white background
    assert pal.getpixel((9, 2)) == RED
    assert load_image(g["gif"]).getpixel((8, 8)) == RED    # first frame
    upright = load_image(g["exif6"])
    assert upright.size == (30, 60)                        # landscape stored, portrait shown
    assert upright.getpixel((24, 5)) == pytest.approx(RED, abs=40)   # top-left marker now top-right
    assert upright.getpixel((5, 5)) == pytest.approx(BLUE, abs=40)
    assert load_image(g["tiny_1x1"]).size == (1, 1)
    assert load_image(g["wide_20000x10"]).size == (20000, 10)
    assert load_image(g["non_utf8"]).mode == "RGB"


def test_decompression_bomb_rejected(hostile, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="decompression-bomb"):
        load_image(hostile["data"] / "train" / "cat" / "bomb.png")
    # Between 1x and 2x PIL's limit PIL only warns; the scan and the decoder reject those too.
    root = tmp_path / "d"
    for c in range(2):
        for i in range(2):
            make_image(root / f"c{c}" / f"{i}.png", c, size=32)
    Image.new("RGB", (40, 40)).save(root / "c0" / "big.png")
    Image.new("RGB", (50, 50)).save(root / "c0" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)          # 1600 px: over 1x, under 2x; 2500 px: over 2x
    report = scan_folder(root)
    assert [(report.relpath(p), "decompression-bomb" in r) for p, r in report.bad_files] == [("c0/big.png", True),
                                                                                           ("c0/huge.png", True)]
    # QA (session 18): one limit in every reason (over 2x PIL's own message named 2400, twice the limit)
    assert [r for _, r in report.bad_files] == ["too many pixels (40x40, over the decompression-bomb limit of 1200)",
                                                "too many pixels (2500 pixels, over the decompression-bomb limit of 1200)"]
    with pytest.raises(DataError, match="decompression-bomb"):
        load_image(root / "c0" / "big.png")


def test_a_photo_with_damaged_exif_is_used_without_pil_warnings(tmp_path):
    """QA: a JPEG whose EXIF block breaks off made PIL print "…/PIL/TiffImagePlugin.py:982: UserWarning: Corrupt
    EXIF data. Expecting to read 12 bytes but only got 10." during the scan, the feature pass and zoo predict;
    the image is used as stored, so the scan keeps it and nothing is printed."""
    import warnings

    root = tmp_path / "d"
    for ci, cls in enumerate(("a", "b")):
        for i in range(2):
            make_image(root / cls / f"{i}.png", ci)
    damaged = root / "a" / "camera.jpg"
    # an EXIF IFD whose only entry (orientation, SHORT x 65535) points past the end of the block
    Image.new("RGB", (8, 6), RED).save(damaged, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"
                                                      b"\xff\xff\xff\xff\x00\x01")
    with warnings.catch_warnings(record=True) as caught:
        report = scan_folder(root)
        image = load_image(damaged)
        device_decodable(damaged.read_bytes())
    assert report.bad_files == [] and len(report.train) + len(report.val) == 5
    assert image.size == (8, 6)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


def test_a_named_pipe_in_a_class_folder_is_skipped_with_its_reason_never_opened(tmp_path):
    """QA (session 18): a FIFO named like an image was listed as "empty file (0 bytes)" by the scan, and zoo
    predict / zoo eval of the folder opened it and waited for a writer for good."""
    from finetune.data.images import read_image_bytes

    root = tmp_path / "d"
    for c in range(2):
        for i in range(2):
            make_image(root / f"c{c}" / f"{i}.png", c, size=16)
    fifo_with_a_late_writer(root / "c0" / "pipe.jpg")
    report = scan_folder(root)
    assert [(report.relpath(p), r) for p, r in report.bad_files] == [("c0/pipe.jpg", "a named pipe, not an image file")]
    for read in (load_image, read_image_bytes):
        with pytest.raises(DataError, match=r"pipe.jpg is a named pipe, not an image file; remove it"):
            read(root / "c0" / "pipe.jpg")


def test_a_stream_that_is_no_image_is_not_called_empty(tmp_path):
    """QA (session 19): `printf 'junk' | zoo predict BUNDLE -` warned "/dev/stdin is an empty file (0 bytes)": a
    pipe's size is 0 whatever it carried. A regular file of no bytes is still called empty."""
    r, w = os.pipe()
    os.write(w, b"not an image at all")
    os.close(w)
    try:
        with pytest.raises(DataError, match=r"is not a readable image; fix or remove it"):
            load_image(f"/dev/fd/{r}")
    finally:
        os.close(r)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jpg is an empty file \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg")


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_a_named_pipe_in_a_data_folder_under_dev_shm_is_still_refused(tmp_path):
    """Review (session 18): the streams a user names (/dev/stdin, /dev/fd/N) are read whatever they are, but a
    data set copied to /dev/shm (RAM) is a folder of files: a FIFO there was opened and zoo predict waited."""
    import tempfile

    from finetune.data.images import special_file

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        fifo_with_a_late_writer(Path(shm) / "pipe.jpg", after_s=2.0)
        with pytest.raises(DataError, match=r"pipe.jpg is a named pipe, not an image file"):
            load_image(Path(shm) / "pipe.jpg")
    assert special_file("/dev/stdin") is None


def test_a_folder_that_cannot_be_listed_is_reported_not_left_out_silently(tmp_path, monkeypatch):
    """QA session 22: a chmod 000 folder (a class's sub-folder, or a whole class) was skipped without a word:
    its images were simply not trained on, and an unreadable class was called an "empty class folder". Tests
    run as root, where chmod 000 does not stop reading, so os.scandir is made to refuse as it does for a user."""
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=4)
    make_image(data / "cat" / "sub" / "hidden_from_us.png", 0)
    locked = {str(data / "cat" / "sub"), str(data / "fox")}
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = scan_folder(data)
    reasons = {report.relpath(p): r for p, r in report.bad_files}
    assert set(reasons) == {"cat/sub", "fox"}
    assert all("folder cannot be read (Permission denied)" in r for r in reasons.values())
    assert report.classes == ["cat", "dog"]
    assert any(w.startswith("cannot read 2 folder(s), e.g. cat/sub") and "left out" in w for w in report.warnings)
    # (review: the folders were also "skipped 2 unreadable or non-image files", counted twice and as files)
    assert not any("non-image files" in w for w in report.warnings)
    make_image(data / "dog" / "broken.png", 0).write_bytes(b"not a png")
    said = [w for w in scan_folder(data).warnings if "non-image files" in w]
    assert len(said) == 1 and said[0].startswith("skipped 1 unreadable or non-image files, e.g. dog/broken.png (")
    write_scan(report, tmp_path / "run")           # bad_files.txt names them, as any skipped file
    listed = (tmp_path / "run" / "bad_files.txt").read_text(encoding="utf-8")
    assert "cat/sub\tfolder cannot be read" in listed and "fox\tfolder cannot be read" in listed
    with pytest.raises(DataError, match="unreadable files"):
        scan_folder(data, strict=True)


def test_a_file_of_another_format_named_jpg_is_refused_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """QA (helper-64): the content decides the decoder, and Pillow has decoders for far more than the files
    training reads: an EPS named .jpg (a web download, `curl ... | zoo predict BUNDLE -`) was opened and
    handed to Ghostscript to decode (`Unable to locate Ghostscript`, or Ghostscript run on whatever the file
    holds where it is installed); a TGA, ICO or PCX named .jpg trained. Only JPEG, PNG, WebP, BMP, GIF,
    TIFF and PPM/PGM are opened now, by every reader (zoo serve already refused the rest); a phone's
    multi-picture JPEG (MPO) and a PNG named .jpg still are."""
    from PIL import EpsImagePlugin

    from finetune.tools.doctor.checks import file_facts

    def ghostscript(*a, **k):
        raise AssertionError("Ghostscript was run on a file from the data folder")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    im = Image.new("RGB", (40, 40), RED)
    (tmp_path / "a").mkdir()
    for fmt in ("EPS", "TGA", "ICO", "PCX"):
        im.save(tmp_path / "a" / f"x_{fmt}.jpg", format=fmt)
    im.save(tmp_path / "a" / "png_named.jpg", format="PNG")
    im.save(tmp_path / "a" / "phone.jpg", format="MPO", save_all=True, append_images=[Image.new("RGB", (40, 40))])
    for i in range(2):
        make_image(tmp_path / "b" / f"b{i}.png", 1)
    report = scan_folder(tmp_path)
    assert sorted(Path(p).name for p, _ in report.bad_files) == ["x_EPS.jpg", "x_ICO.jpg", "x_PCX.jpg", "x_TGA.jpg"]
    assert all("not a readable image" in why for _, why in report.bad_files), report.bad_files
    for fmt in ("EPS", "TGA"):
        path = tmp_path / "a" / f"x_{fmt}.jpg"
        with pytest.raises(DataError, match="is not a readable image"):
            load_image(path)
        assert file_facts([str(path)])[1] == [None]          # zoo doctor reads no size from it
    assert load_image(tmp_path / "a" / "png_named.jpg").size == (40, 40)
    assert load_image(tmp_path / "a" / "phone.jpg").size == (40, 40)         # opened as "MPO"


def test_an_avif_image_is_read_under_its_own_name_and_under_a_jpg_name(tmp_path):
    """Review of the format limit above: browsers save AVIF under .jpg names too (web-scraped folders hold
    such files), and they trained before the limit; AVIF is read wherever this Pillow decodes it, as .avif
    and under a .jpg name, by the scan and by the loaders."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF decoder")
    (tmp_path / "a").mkdir()
    im = Image.new("RGB", (40, 30), RED)
    im.save(tmp_path / "a" / "web.jpg", format="AVIF")
    im.save(tmp_path / "a" / "photo.avif", format="AVIF")
    for i in range(2):
        make_image(tmp_path / "b" / f"b{i}.png", 1)
    report = scan_folder(tmp_path)
    assert report.bad_files == []
    kept = [p for s in report.sets().values() for p, _ in s.items]
    assert sorted(Path(p).name for p in kept if Path(p).parent.name == "a") == ["photo.avif", "web.jpg"]
    for name in ("web.jpg", "photo.avif"):
        assert load_image(tmp_path / "a" / name).size == (40, 30)


def test_a_heic_or_an_avif_this_pillow_cannot_decode_is_named_with_the_way_on(tmp_path, monkeypatch):
    """A phone's HEIC or a browser's AVIF under a .jpg name, where this Pillow has no decoder for it, was 'not a
    readable image (unrecognised or damaged format)': the scan and load_image name the format and what to do."""
    import finetune.data.images as images

    monkeypatch.setattr(images, "IMAGE_FORMATS", tuple(f for f in images.IMAGE_FORMATS if f != "AVIF"))
    (tmp_path / "a").mkdir()
    for name, brand in (("phone.jpg", b"heic"), ("web.jpg", b"avif")):
        (tmp_path / "a" / name).write_bytes(b"\x00\x00\x00\x18ftyp" + brand + bytes(200))
    for i in range(2):
        make_image(tmp_path / "a" / f"a{i}.png", 1)
        make_image(tmp_path / "b" / f"b{i}.png", 1)
    reasons = {Path(p).name: why for p, why in scan_folder(tmp_path).bad_files}
    assert reasons == {
        "phone.jpg": "an HEIC image, which this installation cannot decode (convert it to JPEG or PNG)",
        "web.jpg": "an AVIF image, which this installation cannot decode (install Pillow 11.2 or newer, or "
                   "convert it to JPEG or PNG)"}
    with pytest.raises(DataError, match=r"phone\.jpg is an HEIC image, which this installation cannot decode"):
        load_image(tmp_path / "a" / "phone.jpg")


def test_windows_zone_identifier_files_beside_each_image_are_ignored_as_debris(tmp_path):
    """QA (helper-64): a folder copied from Windows into WSL (or through Samba) holds `x.jpg:Zone.Identifier`
    beside every downloaded image (Windows' mark of the web, a file of its own there): each was a bad file
    (`not an image file type (.identifier)`), one warning per run, and `--strict` refused the folder. They are
    debris like `.DS_Store` now: in no run file, not an error under --strict, not predicted."""
    from finetune.data.files import walk_files

    for cls in (0, 1):
        for i in range(3):
            image = make_image(tmp_path / f"c{cls}" / f"{i}.jpg", cls)
            Path(f"{image}:Zone.Identifier").write_text("[ZoneTransfer]\r\nZoneId=3\r\n")
    report = scan_folder(tmp_path, strict=True)
    assert report.bad_files == [] and not any("Zone" in w for w in report.warnings)
    assert sum(report.counts()["train"].values()) + sum(report.counts()["val"].values()) == 6
    assert not any("Zone" in p for p in walk_files(str(tmp_path)))


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "1"])
def test_a_png_whose_transparency_is_one_colour_is_on_white_as_its_rgba_twin(tmp_path, mode):
    """QA (helper-109): a PNG without an alpha channel whose tRNS chunk names one transparent colour (grey, RGB or
    16-bit grey: what optipng/oxipng make of an RGBA logo whose alpha is all or nothing) kept the hidden colour
    (black here) where the same picture as RGBA or palette PNG is on white: two encodings of one image, two
    pictures for training, predict and serve (one loader: ``to_rgb``)."""
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True                                      # the visible square; the rest is transparent
    grey = np.where(mask, 255, 0).astype(np.uint8)
    store = {"RGB": np.stack([grey] * 3, axis=-1), "L": grey, "I;16": grey.astype(np.uint16) * 257,
             "1": grey.astype(bool)}[mode]
    Image.fromarray(store).save(tmp_path / "key.png", transparency=(0, 0, 0) if mode == "RGB" else 0)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[mask] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert Image.open(tmp_path / "key.png").mode == mode and "transparency" in Image.open(tmp_path / "key.png").info
    keyed = load_image(tmp_path / "key.png")
    assert keyed.getpixel((0, 0)) == (255, 255, 255)           # was (0, 0, 0): the transparent colour as stored
    assert keyed.tobytes() == load_image(tmp_path / "alpha.png").tobytes()


def _bmp_with_an_alpha_mask(pixels: np.ndarray) -> bytes:
    """A 32-bit BMP (BITMAPV5HEADER, BI_BITFIELDS) whose masks name an alpha byte: ``pixels`` (H, W, 4) as BGRA."""
    h, w, _ = pixels.shape
    rows = b"".join(pixels[h - 1 - y].tobytes() for y in range(h))          # bottom-up
    header = (struct.pack("<IiiHHIIiiII", 124, w, h, 1, 32, 3, len(rows), 2835, 2835, 0, 0)
              + struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"sRGB" + bytes(64))
    return struct.pack("<2sIHHI", b"BM", 14 + len(header) + len(rows), 0, 0, 14 + len(header)) + header + rows


def test_an_alpha_channel_that_hides_every_pixel_is_unused_not_a_blank_white_image(tmp_path):
    """QA (helper-109): a 32-bit BMP whose header names an alpha byte that the writer left 0 everywhere (browsers
    and Windows show such a file opaque; torchvision's ``convert("RGB")`` reads its colours) was composited on white:
    every pixel white, a blank image trained on, predicted and served. An alpha channel that hides every pixel is
    taken as unused: the pixels as stored; one that hides some pixels is still on white."""
    bgra = np.zeros((6, 8, 4), dtype=np.uint8)
    bgra[..., 2] = 200                                                      # red 200, alpha 0 everywhere
    bgra[2:4, 2:6, :3] = (30, 160, 10)
    (tmp_path / "unused.bmp").write_bytes(_bmp_with_an_alpha_mask(bgra))
    assert Image.open(tmp_path / "unused.bmp").mode == "RGBA"
    Image.fromarray(np.ascontiguousarray(bgra[..., 2::-1])).save(tmp_path / "plain.bmp")
    assert load_image(tmp_path / "unused.bmp").tobytes() == load_image(tmp_path / "plain.bmp").tobytes()  # was white
    bgra[0, 0, 3] = 255                                                     # one pixel shown: the rest on white
    (tmp_path / "used.bmp").write_bytes(_bmp_with_an_alpha_mask(bgra))
    used = load_image(tmp_path / "used.bmp")
    assert used.getpixel((0, 0)) == (200, 0, 0) and used.getpixel((1, 0)) == (255, 255, 255)


def test_a_multi_picture_jpeg_is_decoded_at_the_reduced_scale_of_a_plain_one(tmp_path):
    """QA (helper-109): Pillow opens a JPEG carrying more pictures (an MPF segment: a phone's Ultra HDR gain map, a
    depth map, a stereo camera's MPO) as format "MPO", and the reduced-scale decode (``draft``) was asked of "JPEG"
    only: such a photo was decoded at full size (12 MP where 0.2 MP do) by training, predict, eval and serve, so
    slower, and resized from other pixels than the same photo without the extra picture."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8))
    photo.save(tmp_path / "plain.jpg", quality=90)
    photo.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[photo.resize((80, 60))], quality=90)
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    plain, phone = load_image(tmp_path / "plain.jpg", 100), load_image(tmp_path / "phone.jpg", 100)
    assert plain.size == (200, 150) and phone.size == (200, 150)          # was (800, 600)
    assert phone.tobytes() == plain.tobytes()                             # the first picture, as a plain JPEG's


def test_a_multi_picture_jpeg_cut_short_in_its_first_picture_is_skipped_by_the_scan(tmp_path):
    """QA (helper-109): the scan proves a JPEG without its end marker by decoding it (a truncated one is skipped
    with its reason), but asked it of format "JPEG" only: a phone's multi-picture JPEG (MPO) cut short inside its
    first picture was kept, then failed in every epoch, in predict and in eval. One cut inside the extra picture
    (the one decoded is whole) is kept, as it decodes."""
    from finetune.data.files import check_files

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[photo.resize((40, 30))], quality=90)
    data = buf.getvalue()
    (tmp_path / "first.jpg").write_bytes(data[:len(data) // 3])
    (tmp_path / "second.jpg").write_bytes(data[:-200])
    first, second = check_files([str(tmp_path / "first.jpg"), str(tmp_path / "second.jpg")])
    assert first is not None and "truncated" in first                    # was None: kept
    assert second is None and load_image(tmp_path / "second.jpg").size == (160, 120)
    with pytest.raises(DataError, match="truncated"):
        load_image(tmp_path / "first.jpg")
    # a scan memo of an earlier version, which found it fine, is not trusted with it (the memo's format moved on)
    from finetune.data import files

    memo = tmp_path / "memo.json"
    st = os.stat(tmp_path / "first.jpg")
    memo.write_text(json.dumps({"made_with": {**files._memo_header(), "format": 3}, "files": {
        str(tmp_path / "first.jpg"): [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]}}))
    assert "truncated" in check_files([str(tmp_path / "first.jpg")], memo)[0]


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "1"])
def test_a_png_whose_transparent_colour_is_every_pixel_is_read_as_stored_at_any_depth(tmp_path, mode):
    """Review (helper-110): a tRNS colour key that every pixel has hides the whole picture, which ``to_rgb`` takes
    as a key (alpha) left unused: the pixels as stored. 8-bit grey, RGB and 1-bit PNGs went that way (through their
    alpha), a 16-bit grey one was painted white: a blank image, the same file at another bit depth."""
    store = {"RGB": np.full((4, 6, 3), 40, np.uint8), "L": np.full((4, 6), 40, np.uint8),
             "I;16": np.full((4, 6), 40 * 257, np.uint16), "1": np.ones((4, 6), bool)}[mode]
    key = {"RGB": (40, 40, 40), "L": 40, "I;16": 40 * 257, "1": 1}[mode]
    Image.fromarray(store).save(tmp_path / "key.png", transparency=key)
    assert Image.open(tmp_path / "key.png").mode == mode and "transparency" in Image.open(tmp_path / "key.png").info
    expect = (255,) * 3 if mode == "1" else (40, 40, 40)
    assert set(load_image(tmp_path / "key.png").getdata()) == {expect}        # I;16 was {(255, 255, 255)}
