"""Reliability (issue 8): `zoo finetune` on hostile image folders trains with the bad files skipped and
listed, or stops with one line before any model is built. Never a traceback, never a crash after training.

The cases themselves come from ``tests/finetune/test_hostile_data.py::build_hostile_folder`` (the data
layer's tests check each decode in detail); here the whole command runs on them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import corrupt_jpeg, register_tiny  # noqa: F401  (register_tiny: imported from here by other tests)




FAST = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--freeze", "head",
        "--no-export"]


def invoke(*args):
    from click.testing import CliRunner

    from zoo.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def bad_listed(run: Path) -> dict[str, str]:
    lines = (run / "bad_files.txt").read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t", 1) for line in lines)


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> str:
    return register_tiny(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    from tests.finetune.test_hostile_data import build_hostile_folder

    return build_hostile_folder(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail loudly if anything builds or downloads a model."""
    import zoo.build
    import zoo.sources

    def forbidden(*a, **kw):
        raise AssertionError("a model was built before the data was validated")

    for mod, name in ((zoo.build, "create_model"), (zoo.build, "build_architecture"), (zoo.sources, "pull")):
        monkeypatch.setattr(mod, name, forbidden)


def test_hostile_folder_trains_with_bad_files_skipped_and_listed(hostile, tiny, tmp_path):
    """Truncated/zero-byte/text-as-JPEG files, a decompression bomb, symlink loops, debris, an empty class
    folder, a class without validation images, odd but valid images (1x1, 20000x10, CMYK, 16-bit, palette
    with transparency, animated GIF, EXIF-rotated) and non-UTF-8 / space-laden names: the run trains and
    exports; the unusable files are listed in bad_files.txt; the warnings are printed once each."""
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", hostile["data"], "--out", run, *FAST[:-1], "--export")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    listed = bad_listed(run)
    assert set(listed) == set(hostile["bad"])
    for rel, word in hostile["bad"].items():
        assert word in listed[rel], (rel, listed[rel])
    assert "skipped" in res.stderr and "bad_files.txt" in res.stderr
    for word in ("empty class folder", "no validation images"):
        assert word in res.stderr, res.stderr
    debris = ("__MACOSX", ".DS_Store", "._good", ".hidden", "Thumbs.db")
    everything = "".join(p.read_text(encoding="utf-8", errors="replace")
                         for p in (run / "scan.json", run / "split.json", run / "bad_files.txt"))
    assert not any(d in everything for d in debris)
    assert (run / "checkpoints" / "best.safetensors").is_file() and (run / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["one_class", "no_images", "val_class_not_in_train", "missing", "strict"])
def test_untrainable_folders_stop_before_any_model_with_one_line(hostile, tiny, tmp_path, no_model_build, case):
    data = hostile["data"] if case == "strict" else hostile["fatal"][case]
    extra = ["--strict"] if case == "strict" else []
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *FAST, *extra)
    assert res.exit_code in (1, 2), res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("zoo: error:")]
    assert len(errors) == 1, res.stderr
    assert not (run / "checkpoints").exists()


def _passes_scan_fails_decode(path: Path) -> Path:
    """A JPEG with intact headers and end marker whose entropy-coded data is garbage: PIL's verify() and
    the scan accept it; only a full decode fails (tests.conftest.corrupt_jpeg)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90)
    path.write_bytes(corrupt_jpeg(buf.getvalue()))
    return path


@pytest.mark.parametrize("path", ["--no-fast-head", "--fast-head"])
def test_decode_failure_inside_a_worker_is_caught_per_image_and_listed(tiny, tmp_path, path):
    from finetune.data import scan_folder
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6, layout="split", val_per_class=2)
    bad = _passes_scan_fails_decode(data / "train" / "a" / "sneaky.jpg")
    assert scan_folder(data).bad_files == []          # the scan cannot tell
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *FAST, "--workers", "1", path)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2                              # the epoch ran: one image dropped, not the batch
    assert "sneaky.jpg" in res.stderr and "failed to load" in res.stderr       # reported ...
    assert any("sneaky.jpg" in k for k in bad_listed(run))   # ... and listed in the run folder, on both paths
    assert bad.exists()


# Class names that cannot be file names on some system: ':' '?' '*' '"' (Windows), a very long one, unicode.
ODD_CLASSES = ("a:b?c", 'star*"quote"', "x" * 200, "café 猫 ✓")


def test_class_names_that_are_not_portable_file_names_survive_export_and_predict(tiny, tmp_path):
    import json

    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=ODD_CLASSES, per_class=4, layout="split", val_per_class=1)
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *FAST[:-1], "--export")
    assert res.exit_code == 0, res.output
    bundle = run / "export"
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    assert sorted(config["label_names"]) == sorted(ODD_CLASSES)       # labels are data, in JSON
    assert sorted(p.name for p in bundle.iterdir() if p.is_file()) == sorted(
        p.name for p in bundle.iterdir() if p.is_file() and p.name.isascii())   # no file named after a class
    img = next((data / "val" / ODD_CLASSES[3]).iterdir())
    res = invoke("predict", bundle, img, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc[0]["predictions"][0]["label"] in ODD_CLASSES


def test_eval_and_predict_with_file_names_that_are_not_utf8(tiny, tmp_path):
    """File names that are not UTF-8 (surrogates in Python: an image filed under the wrong class, an
    unreadable file) and one with a no-break space (valid UTF-8, not printable): zoo eval writes its reports
    instead of failing on metrics.json, and eval --json / predict --json print JSON that parses (the
    console escapes what is not printable, which used to put \\xNN escapes, invalid JSON, into strings)."""
    import json
    import os
    import shutil

    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, layout="split", val_per_class=1)
    run = tmp_path / "run"
    assert invoke("finetune", tiny, "--data", data, "--out", run, *FAST[:-1], "--export").exit_code == 0
    ev = make_image_folder(tmp_path / "ev", classes=("a", "b"), per_class=2, seed=1)
    wrong = os.fsdecode(os.path.join(os.fsencode(ev / "b"), b"wr\xf3ng.png"))        # an "a" image under b/
    shutil.copy(next((ev / "a").iterdir()), wrong)
    junk = os.fsdecode(os.path.join(os.fsencode(ev / "a"), b"b\xe4d.jpg"))
    Path(junk).write_bytes(b"not a picture")
    shutil.copy(next((ev / "a").iterdir()), ev / "a" / "no\u00a0break.png")

    res = invoke("eval", run / "export", "--data", ev, "--out", tmp_path / "report", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    doc = json.loads(res.stdout)
    assert doc == json.loads((tmp_path / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert [s["path"] for s in doc["skipped"]] == [str(ev / "a" / "b\\xe4d.jpg")]
    assert str(ev / "b" / "wr\\xf3ng.png") in [w["path"] for w in doc["most_confidently_wrong"]]
    assert "wr\\xf3ng.png" in (tmp_path / "report" / "wrong.csv").read_text(encoding="utf-8")

    res = invoke("predict", run / "export", ev, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    images = [d["image"] for d in json.loads(res.stdout)]
    assert str(ev / "a" / "no\u00a0break.png") in images and str(ev / "b" / "wr\\xf3ng.png") in images


def test_a_class_folder_name_that_is_not_utf8_trains_exports_and_evaluates(tiny, tmp_path):
    """The class is named by its folder's printable name (b\\xe9): it used to reach model.json as surrogates
    and end the run with a UnicodeEncodeError traceback before the first epoch. zoo eval on the same folder
    matches the folder to that label."""
    import json
    import os

    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, layout="split", val_per_class=1)
    for split in ("train", "val"):
        os.rename(data / split / "b", os.path.join(os.fsencode(data / split), b"b\xe9"))
    run = tmp_path / "run"
    res = invoke("finetune", tiny, "--data", data, "--out", run, *FAST[:-1], "--export")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "export" / "config.json").read_text(encoding="utf-8"))["label_names"] == ["a", "b\\xe9"]
    res = invoke("eval", run / "export", "--data", data, "--out", tmp_path / "report", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ignored_folders"] == [] and doc["per_class"]["b\\xe9"]["support"] == 1


def test_two_class_folders_with_one_printable_name_are_refused_not_merged(tmp_path):
    """A folder named with the byte \\xe9 and one named with the text \\xe9 would be one class: the scan
    refuses in one line instead of silently merging them."""
    import os

    from finetune.core.errors import DataError
    from finetune.data import scan_folder
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    os.rename(data / "a", os.path.join(os.fsencode(data), b"caf\xe9"))
    os.rename(data / "b", data / "caf\\xe9")
    with pytest.raises(DataError, match=r"two class folders in .* read caf\\xe9 .*rename one"):
        scan_folder(data)
