"""scripts/transfer_check.py's data preparation: the few-shot splits it measures on must not leak."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.conftest import load_script as _load_script

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return _load_script('transfer_check')


def fake_stamps(root: Path) -> Path:
    """A tuxpaint-like tree: photos per class, plus cartoon drawings and SVGs that must be left out."""
    tc = load_script()
    for i, sub in enumerate(tc.STAMP_CLASSES.values()):
        for j in range(8 + i):
            folder = root / sub / ("deep" if j % 3 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGBA", (12, 10), (j * 20, i * 40, 90, 255)).save(folder / f"p{j}.png")
        (root / sub / "cartoon").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / sub / "cartoon" / "drawing.png")
        (root / sub / "vector.svg").write_text("<svg/>")
    return root


def test_stamp_files_skip_drawings(tmp_path):
    tc = load_script()
    files = tc.stamp_files(fake_stamps(tmp_path / "stamps"))
    assert list(files) == list(tc.STAMP_CLASSES)
    assert [len(v) for v in files.values()] == [8, 9, 10, 11, 12]
    assert not any("cartoon" in str(p) or p.suffix != ".png" for v in files.values() for p in v)


def test_splits_are_disjoint_complete_and_seeded(tmp_path):
    tc = load_script()
    files = tc.stamp_files(fake_stamps(tmp_path / "stamps"))
    counts = tc.write_stamps_folder(tmp_path / "a", files, train=3, val=2, seed=1)
    assert counts == {"train": 15, "val": 10, "test": sum(len(v) for v in files.values()) - 25}
    for name, paths in files.items():
        seen = {s: {p.name for p in (tmp_path / "a" / s / name).iterdir()} for s in ("train", "val", "test")}
        assert len(seen["train"]) == 3 and len(seen["val"]) == 2
        assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
        assert sum(len(v) for v in seen.values()) == len(paths)          # every image used exactly once
    tc.write_stamps_folder(tmp_path / "b", files, train=3, val=2, seed=1)
    tc.write_stamps_folder(tmp_path / "c", files, train=3, val=2, seed=2)
    listing = {d: sorted(p.relative_to(tmp_path / d).as_posix() for p in (tmp_path / d).rglob("*.png"))
               for d in "abc"}
    assert listing["a"] == listing["b"] and listing["a"] != listing["c"]


def test_balanced_accuracy_is_mean_recall():
    tc = load_script()
    metrics = {"per_class": {"x": {"recall": 1.0, "support": 10}, "y": {"recall": 0.5, "support": 2},
                             "z": {"recall": None, "support": 0}}}
    assert tc.balanced_accuracy(metrics) == 0.75
