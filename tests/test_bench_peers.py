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
    tc = bp._transfer_check()
    for sub in bp.PEER_CLASSES.values():
        (tmp_path / sub).mkdir(parents=True)
        Image.new("RGBA", (3, 3)).save(tmp_path / sub / "p.png")
    files = tc.stamp_files(tmp_path, bp.PEER_CLASSES)
    assert list(files) == list(bp.PEER_CLASSES) and all(len(v) == 1 for v in files.values())
