"""scripts/bench_peers.py's data preparation: every tool must read the same RGB pixels."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.conftest import load_script as _load_script

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return _load_script('bench_peers')


def test_cutouts_are_composited_on_white_as_rgb(tmp_path):
    bp = load_script()
    im = Image.new("RGBA", (4, 2), (10, 20, 30, 0))      # transparent: what fastai/timm would see as (10,20,30)
    im.putpixel((0, 0), (200, 100, 50, 255))               # opaque
    (tmp_path / "train" / "a").mkdir(parents=True)
    im.save(tmp_path / "train" / "a" / "x.png")
    bp.flatten_on_white(tmp_path)
    out = Image.open(tmp_path / "train" / "a" / "x.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (200, 100, 50) and out.getpixel((3, 1)) == (255, 255, 255)


def test_peer_classes_are_stamp_folders_the_loader_reads(tmp_path):
    bp = load_script()
    tc = bp._script("transfer_check")
    for sub in bp.PEER_CLASSES.values():
        (tmp_path / sub).mkdir(parents=True)
        Image.new("RGBA", (3, 3)).save(tmp_path / sub / "p.png")
    files = tc.stamp_files(tmp_path, bp.PEER_CLASSES)
    assert list(files) == list(bp.PEER_CLASSES) and all(len(v) == 1 for v in files.values())


def _mnist_csv(path: Path, per_class: int, classes: int = 2) -> Path:
    """A tiny mnist_5k.csv.gz: 784 pixels (black, one white square of ink) then the label, per row."""
    import gzip

    rows = []
    for i in range(per_class * classes):
        pixels = [0] * 784
        for r in range(10, 18):
            pixels[r * 28 + 10:r * 28 + 18] = [255] * 8
        rows.append(",".join(map(str, [*pixels, i % classes])))
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    return path


def _names(root: Path, split: str) -> set[str]:
    return {p.relative_to(root / split).as_posix() for p in (root / split).rglob("*.png")}


def test_mnist5k_split_is_seeded_white_on_black_and_its_test_images_do_not_move(tmp_path, monkeypatch):
    """--dataset mnist5k writes scripts/mnist5k.py's folders (the writer ablate_medium.py uses) with the plan's
    validation and test sizes; a larger training set leaves a seed's validation and test images where they are."""
    import argparse

    bp = load_script()
    monkeypatch.setitem(bp.MEDIUM, "mnist5k", {"train": 2, "val": 1, "test": 2})
    csv_gz = _mnist_csv(tmp_path / "mnist.csv.gz", per_class=6)
    args = argparse.Namespace(dataset="mnist5k", mnist_csv=str(csv_gz), train_per_class=2)
    assert bp.write_medium_split(args, tmp_path / "a", seed=0) == {"train": 4, "val": 2, "test": 4}
    args.train_per_class = 3
    assert bp.write_medium_split(args, tmp_path / "b", seed=0) == {"train": 6, "val": 2, "test": 4}
    for split in ("val", "test"):
        assert _names(tmp_path / "a", split) == _names(tmp_path / "b", split)
    assert _names(tmp_path / "a", "train") < _names(tmp_path / "b", "train")
    assert {p.name for p in (tmp_path / "a" / "train").iterdir()} == {"0", "1"}
    bp.write_medium_split(args, tmp_path / "c", seed=1)
    assert _names(tmp_path / "c", "test") != _names(tmp_path / "b", "test")
    image = Image.open(next((tmp_path / "a" / "test" / "1").iterdir()))
    assert image.mode == "L" and image.size == (64, 64)
    assert image.getpixel((0, 0)) == 0 and image.getpixel((32, 32)) == 255     # white ink on black


def test_mnist5k_refuses_more_images_than_a_class_holds(tmp_path, monkeypatch):
    import argparse

    import pytest

    bp = load_script()
    monkeypatch.setitem(bp.MEDIUM, "mnist5k", {"train": 2, "val": 1, "test": 2})
    args = argparse.Namespace(dataset="mnist5k", mnist_csv=str(_mnist_csv(tmp_path / "m.csv.gz", 6)), train_per_class=4)
    with pytest.raises(SystemExit, match="at most 3 train"):
        bp.write_medium_split(args, tmp_path / "d", seed=0)
    assert not (tmp_path / "d").exists()


def test_mnist5k_needs_its_csv(monkeypatch):
    import pytest

    bp = load_script()
    monkeypatch.setattr("sys.argv", ["bench_peers.py", "--dataset", "mnist5k", "--only", "zoo,probe"])
    with pytest.raises(SystemExit, match="--mnist-csv"):
        bp.main()


def test_fastai_knobs_parse_as_python_literals():
    bp = load_script()
    assert bp._kwargs("do_flip=False, max_rotate=0.,max_zoom=1") == {"do_flip": False, "max_rotate": 0.0, "max_zoom": 1}
    assert bp._kwargs("") == {} and bp._kwargs(None) == {}


def test_fastai_stage_split_puts_every_parameter_in_one_of_three_groups():
    """The `fastai-stages` row's splitter on fastai's (TimmBody, head) model: stem + stages 0-3, stages 4-6 +
    the final conv, the head; each parameter exactly once (fastai's optimizer would train a missing one never)."""
    import timm
    import torch.nn as nn

    bp = load_script()

    class Body(nn.Module):       # fastai's TimmBody keeps the timm model as .model
        def __init__(self):
            super().__init__()
            self.model = timm.create_model(bp.TIMM_ARCH, pretrained=False, num_classes=0)

    model = nn.Sequential(Body(), nn.Sequential(nn.BatchNorm1d(2560), nn.Linear(2560, 10)))
    groups = bp._timm_stage_split(model)
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    body = model[0].model
    group = {id(p): i for i, g in enumerate(groups) for p in g}
    assert group[id(body.conv_stem.weight)] == 0 and group[id(body.blocks[3][0].conv_pw.weight)] == 0
    assert group[id(body.blocks[4][0].conv_pw.weight)] == 1 and group[id(body.conv_head.weight)] == 1
    assert group[id(model[1][1].weight)] == 2
