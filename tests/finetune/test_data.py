"""finetune.data: layouts, the split file, transforms from the data config, datasets and loaders."""
from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.core.config import FinetuneConfig
from finetune.data import (
    DeviceAugment,
    DeviceNormalize,
    ImageDataset,
    ImageSet,
    build_transform,
    class_weights,
    close_loader,
    collate_skip_none,
    load_image,
    load_image_tensor,
    make_loader,
    resolve_workers,
    scan_folder,
    write_scan,
)
from finetune.core.errors import ConfigError, DataError
from finetune.core.seeding import sample_seed
from tests.conftest import make_image, make_image_folder

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
               "crop_mode": "center", "mean": (0.2, 0.4, 0.6), "std": (0.5, 0.25, 0.1)}
ALL_OFF = FinetuneConfig(crop_scale_min=1.0, hflip=0.0, brightness=0.0, contrast=0.0)


def rels(report, image_set):
    return sorted((report.relpath(p), image_set.classes[label]) for p, label in image_set.items)


# ----------------------------------------------------------------------------------------- scan
def test_flat_layout_stratified_split(image_folder):
    report = scan_folder(image_folder, val_split=0.25, seed=0)
    assert report.layout == "flat"
    assert report.classes == ["cat", "dog", "fox"]
    counts = report.counts()
    assert counts["train"] == {"cat": 9, "dog": 9, "fox": 9}      # 12 per class, 25% held out per class
    assert counts["val"] == {"cat": 3, "dog": 3, "fox": 3}
    assert report.test is None and report.bad_files == [] and report.warnings == []
    assert not set(report.train.items) & set(report.val.items)
    json.dumps(report.to_dict())


def test_split_layout_with_test(tmp_path):
    root = make_image_folder(tmp_path / "d", layout="split", per_class=5, val_per_class=2)
    make_image(root / "test" / "cat" / "t0.png", 0)
    report = scan_folder(root)
    assert report.layout == "split"
    assert report.counts() == {"train": {"cat": 5, "dog": 5, "fox": 5}, "val": {"cat": 2, "dog": 2, "fox": 2},
                               "test": {"cat": 1, "dog": 0, "fox": 0}}
    d = report.to_dict()
    assert d["images"] == {"train": 15, "val": 6, "test": 1}
    assert all(p.startswith("val/") for p, _ in rels(report, report.val))


def test_train_only_folder_is_split_here(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=5)
    report = scan_folder(tmp_path / "d", val_split=0.2)
    assert report.layout == "flat" and report.counts()["val"] == {"cat": 1, "dog": 1, "fox": 1}


def test_split_folders_in_another_case_are_the_split(tmp_path):
    """QA: Train/ and Val/ (Windows, macOS) were read as a flat folder of two classes, "Train" and "Val"."""
    root = tmp_path / "d"
    make_image_folder(root / "Train", per_class=3)
    make_image_folder(root / "VALID", per_class=1)
    make_image(root / "Test" / "cat" / "t0.png", 0)
    report = scan_folder(root)
    assert report.layout == "split" and report.classes == ["cat", "dog", "fox"]
    assert report.counts()["val"] == {"cat": 1, "dog": 1, "fox": 1} and len(report.test) == 1
    assert all(p.startswith("VALID/") for p, _ in rels(report, report.val))


@pytest.mark.parametrize("folders", [("val",), ("val", "test"), ("Validation", "TEST")])
def test_split_folders_without_train_are_refused_not_read_as_classes(tmp_path, folders):
    """QA: val/ + test/ without train/ trained a classifier of two classes, "test" and "val"."""
    for name in folders:
        make_image_folder(tmp_path / "d" / name, per_class=2)
    with pytest.raises(DataError, match=r"holds .*/ but no train/ folder: put the training images in "
                                        r"DIR/train/<class>/"):
        scan_folder(tmp_path / "d")


@pytest.mark.parametrize("split", ["test", "Val", "train", "Testing", "validation_set"])
def test_a_split_folder_of_the_same_classes_beside_class_folders_is_refused_not_trained_as_a_class(tmp_path, split):
    """Dataset-shapes audit (helper-120): DIR/cat/, DIR/dog/ and a held-out DIR/test/cat/, DIR/test/dog/ beside
    them trained three classes, "test" among them, its images (cats and dogs) learnt as one class and cut
    from the test set. A folder named as a split holding a sub-folder named as a class beside it is refused;
    a class of that name whose sub-folders are no classes (``valid/`` beside ``invalid/``) stays a class."""
    root = make_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=3, size=16)
    make_image_folder(root / split, classes=("dog", "eel"), per_class=1, size=16)
    role = {"test": "test", "Val": "val", "train": "train", "Testing": "test", "validation_set": "val"}[split]
    with pytest.raises(DataError, match=rf"holds class folders cat, dog and {split}/, whose folders dog, eel are "
                                        rf"classes too, so it looks like {role} images, not a class: lay the folders "
                                        r"out as DIR/train/<class>/ and DIR/val/<class>/"):
        scan_folder(root)
    shutil.rmtree(root / split / "dog")
    assert scan_folder(root).classes == sorted(["cat", "dog", split])


@pytest.mark.parametrize("folders", [("Training", "Testing"), ("train", "validation_set"),
                                     ("training_set/training_set", "test_set/test_set")])
def test_folders_named_as_two_splits_of_the_same_classes_are_refused_not_trained_as_two_classes(tmp_path, folders):
    """Dataset-shapes audit (helper-120): Training/<class>/ + Testing/<class>/ (a common download's layout; Kaggle's
    cats and dogs one level deeper, training_set/training_set/<class>/) trained a classifier of "Testing" against
    "Training". Two folders named as different splits that hold folders of one name are refused; classes so
    named whose folders differ (dates, sources) stay classes."""
    first, second = folders
    make_image_folder(tmp_path / "d" / first, classes=("cats", "dogs"), per_class=2, size=16)
    make_image_folder(tmp_path / "d" / second, classes=("cats", "dogs"), per_class=1, size=16)
    with pytest.raises(DataError, match=rf"holds {first}/ and {second}/, whose folders cats, dogs are the same "
                                        r"classes, so they look like train and (val|test) images, not two classes"
                                        rf".*, or give .*{first} alone as the data folder"):
        scan_folder(tmp_path / "d")
    assert scan_folder(tmp_path / "d" / first).classes == ["cats", "dogs"]    # what the line offers: it trains
    make_image_folder(tmp_path / "e" / "valley", classes=("2019", "2020"), per_class=2, size=16)
    make_image_folder(tmp_path / "e" / "testing", classes=("2019", "2020"), per_class=2, size=16)
    make_image_folder(tmp_path / "e" / "test_a", classes=("2019", "2020"), per_class=2, size=16)
    assert scan_folder(tmp_path / "e").classes == ["test_a", "testing", "valley"]      # one split word, or none


def test_split_named_classes_sharing_the_folders_every_class_holds_stay_classes(tmp_path):
    """Review of helper-120's refusal (helper-123): classes that each hold the same sub-folders (views, a face
    dataset's sessions, a radiography set's images/ and masks/) were refused as two splits where two of them were
    named with a split word (a train of vehicles beside a test_tube, Val_Kilmer beside Test_Person). Folders that
    a class not so named holds too are no classes: they stay classes."""
    def make(root, folders):
        for rel in folders:
            make_image_folder((root / rel).parent, classes=((root / rel).name,), per_class=1, size=16)
        return root

    views = make(tmp_path / "v", ["train/front", "train/side", "test_tube/front", "test_tube/side", "car/front"])
    assert scan_folder(views).classes == ["car", "test_tube", "train"]
    faces = make(tmp_path / "f", ["Val_Kilmer/s1", "Val_Kilmer/s2", "Test_Person/s1", "Test_Person/s2", "Anna/s1"])
    assert scan_folder(faces).classes == ["Anna", "Test_Person", "Val_Kilmer"]
    masks = make(tmp_path / "m", [f"{c}/{k}" for c in ("COVID", "Normal", "test_pos", "training_neg")
                                  for k in ("images", "masks")])
    assert scan_folder(masks).classes == ["COVID", "Normal", "test_pos", "training_neg"]


@pytest.mark.parametrize("folders", [("seg_train/seg_train", "seg_test/seg_test"), ("TrainImages", "TestImages"),
                                     ("trainset", "testset"), ("Training", "Test")])
def test_split_folders_named_by_a_later_word_or_camel_case_are_refused(tmp_path, folders):
    """Review (helper-123): the first-word rule read Intel's seg_train/seg_train/<class>/ + seg_test/seg_test/<class>/
    (a popular download), TrainImages/ + TestImages/ and trainset/ + testset/ as classes: a classifier of the splits.
    A folder reads as a split by the first of its words (CamelCase humps too; ``trainset`` is train) naming one."""
    first, second = folders
    make_image_folder(tmp_path / "d" / first, classes=("forest", "sea"), per_class=2, size=16)
    make_image_folder(tmp_path / "d" / second, classes=("forest", "sea"), per_class=1, size=16)
    make_image(tmp_path / "d" / "seg_pred" / "seg_pred" / "0.png", 0)      # Intel's unlabelled images beside
    with pytest.raises(DataError, match=rf"holds {first}/ and {second}/, whose folders forest, sea are the same "
                                        r"classes, so they look like train and test images"):
        scan_folder(tmp_path / "d")


def test_a_split_folder_of_one_class_or_of_classes_in_another_case_beside_classes_is_refused(tmp_path):
    """Review (helper-123): DIR/test/ holding one class folder was read one level down (its one folder, as Kaggle's
    test_set/test_set/), so DIR/test/cat/ beside DIR/cat/ trained a class "test"; DIR/test/cat/ beside DIR/Cat/
    too (names compared in their case). Both are refused, as DIR/test/cat/ + DIR/test/dog/ beside DIR/cat/ is."""
    root = make_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=2, size=16)
    make_image_folder(root / "test", classes=("cat",), per_class=1, size=16)
    with pytest.raises(DataError, match=r"holds class folders cat, dog and test/, whose folders cat are classes too"):
        scan_folder(root)
    root = make_image_folder(tmp_path / "e", classes=("Cat", "Dog"), per_class=2, size=16)
    make_image_folder(root / "test", classes=("cat", "dog"), per_class=1, size=16)
    with pytest.raises(DataError, match=r"holds class folders Cat, Dog and test/, whose folders cat, dog are classes"):
        scan_folder(root)


def test_classes_of_a_single_image_are_one_warning_however_many(tmp_path):
    """A note per single-image class printed 1,000 warning lines for 1,000 such classes: one line names how
    many and the first 5. Many-classes audit (helper-128): the split's own note ("N classes have only 1 image
    ...: none held out") and the validation check's warning named the same classes twice in a row; the
    check's line (what it costs, what to do) is the one left."""
    from finetune.data.splits import stratified_split

    files = {f"c{i:04d}": [f"/d/c{i:04d}/{j}.png" for j in range(1 if i % 2 else 3)] for i in range(2000)}
    train, val = stratified_split(files, 0.2, 0, "/d")
    assert len(val["c0001"]) == 0 and len(val["c0000"]) == 1 and len(train["c0000"]) == 2
    rng = random.Random(0)
    for c in range(200):     # a long tail: 1 image in every 10th class, 2 in the others
        for i in range(1 if c % 10 == 0 else 2):
            make_image(tmp_path / "d" / f"c{c:03d}" / f"{i}.png", c, 12, rng)
    report = scan_folder(tmp_path / "d")
    assert report.counts()["val"]["c000"] == 0 and report.counts()["val"]["c001"] == 1
    naming = [w for w in report.warnings if "c000" in w]
    assert naming == ["class(es) c000, c010, c020, c030, c040 and 15 more have no validation images; their accuracy "
                      "cannot be measured (a class folder needs 2 or more images for one to be held out)"]


def test_split_is_deterministic_and_seeded(image_folder):
    a, b = scan_folder(image_folder, seed=0), scan_folder(image_folder, seed=0)
    c = scan_folder(image_folder, seed=1)
    assert rels(a, a.val) == rels(b, b.val)
    assert rels(a, a.val) != rels(c, c.val)
    assert c.counts() == a.counts()


def test_split_file_round_trip(image_folder, tmp_path):
    first = scan_folder(image_folder, seed=3)
    write_scan(first, tmp_path / "run")
    for name in ("scan.json", "split.json", "bad_files.txt"):
        assert (tmp_path / "run" / name).exists()
    scan = json.loads((tmp_path / "run" / "scan.json").read_text())
    assert scan["counts"] == first.counts() and scan["fingerprint"] == first.fingerprint()
    # A rerun with other options still uses the saved split, and says so.
    again = scan_folder(image_folder, seed=7, val_split=0.5, split_file=tmp_path / "run" / "split.json")
    assert rels(again, again.val) == rels(first, first.val)
    assert rels(again, again.train) == rels(first, first.train)
    assert again.fingerprint() == first.fingerprint()
    assert any("reusing the split" in w for w in again.warnings)
    # A split file path that does not exist yet: a fresh split.
    fresh = scan_folder(image_folder, seed=3, split_file=tmp_path / "nope" / "split.json")
    assert rels(fresh, fresh.val) == rels(first, first.val)



def test_every_validation_image_of_a_split_file_gone_says_so_not_make_a_split(image_folder, tmp_path):
    """QA session 22: a resume after the run's validation images were deleted (or moved) said "no validation images
    in DIR: ... use DIR/<class>/ folders with at least 2 images per class so a split can be made", of a folder that
    is just that. It now says the images split.json recorded are gone, and to put them back."""
    first = scan_folder(image_folder)
    write_scan(first, tmp_path / "run")
    for p, _ in first.val.items:
        os.remove(p)
    with pytest.raises(DataError) as err:
        scan_folder(image_folder, split_file=tmp_path / "run" / "split.json")
    assert str(err.value) == _validation_gone(first, image_folder)


def _validation_gone(first, root) -> str:
    """The refusal of a resume whose recorded validation images are all gone (splits._validation_gone)."""
    return (f"none of the {len(first.val)} validation images recorded in split.json is in {root} any more (e.g. "
            f"{first.relpath(first.val.items[0][0])}): moved or deleted since the run began? Put them back to "
            "continue the run (a new split would validate on images it has trained on)")


@pytest.mark.parametrize("excluded_all", [False, True])
def test_the_val_folder_of_a_split_run_gone_is_not_made_again_from_train(tmp_path, excluded_all):
    """Review (helper-78): a resume after a train/ + val/ run's val/ was deleted (or moved) read DIR as a flat folder
    (train/ alone) and split train/ by the seed, one warning ("using the folder's split"): the run went on validating
    on images it had trained on, where the same loss from a flat folder is refused. Refused the same way now; a run
    that had no validation images (its --exclude listed every one) goes on without, as from a flat folder."""
    root = make_image_folder(tmp_path / "d", layout="split", per_class=4, val_per_class=2)
    first = scan_folder(root)
    if excluded_all:
        first.val = ImageSet([], first.classes)
    write_scan(first, tmp_path / "run")
    shutil.rmtree(root / "val")
    if excluded_all:
        again = scan_folder(root, split_file=tmp_path / "run" / "split.json")
        assert len(again.val) == 0 and rels(again, again.train) == rels(first, first.train)
        assert any("records no validation images" in w for w in again.warnings)
        return
    with pytest.raises(DataError) as err:
        scan_folder(root, split_file=tmp_path / "run" / "split.json")
    assert str(err.value) == _validation_gone(first, root)


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_a_split_file_and_class_names_survive_a_rename_into_the_other_unicode_form(tmp_path, layout):
    """QA (helper-45): after `cp -R` through macOS (names decomposed), every file of class élan was "moved to another
    class" for the split file, and got a new side by the seed (validation images into training); the class was
    named in the new form, so a resume refused it. Matched by class_key now, with the run's own names kept."""
    import unicodedata

    nfd = lambda name: unicodedata.normalize("NFD", name)     # noqa: E731
    data = make_image_folder(tmp_path / "data", classes=("élan", "fox", "gnu"), per_class=6, layout=layout,
                             val_per_class=2, size=16)
    first = scan_folder(data, seed=3, val_split=0.5)
    write_scan(first, tmp_path / "run")
    for split in [data] if layout == "flat" else [data / "train", data / "val"]:
        for f in (split / "élan").iterdir():
            f.rename(split / "élan" / nfd(f.name))
        (split / "élan").rename(split / nfd("élan"))
    assert scan_folder(data).classes == [nfd("élan"), "fox", "gnu"]     # decomposed, it sorts first
    again = scan_folder(data, seed=3, val_split=0.5, split_file=tmp_path / "run" / "split.json",
                        class_names=first.classes)
    assert again.classes == first.classes == ["fox", "gnu", "élan"] and again.warnings == first.warnings
    for got, want in ((again.train, first.train), (again.val, first.val)):
        assert [(unicodedata.normalize("NFC", p), label) for p, label in got.items] == want.items
        assert all(os.path.isfile(p) for p, _ in got.items)


def test_a_split_file_keeps_the_files_of_a_class_folder_that_lost_whitespace_at_an_end(tmp_path):
    """Review (h68): class_key strips whitespace, so a run's class `cat ` is the folder `cat` on its resume; the
    split file matched files by the NFC form of their paths only, so every file of the class was removed and
    added, and given a new side by the seed (validation images into training, the resume not refused)."""
    data = make_image_folder(tmp_path / "data", classes=("cat ", "fox", "gnu"), per_class=6, size=16)
    first = scan_folder(data, seed=3, val_split=0.5)
    write_scan(first, tmp_path / "run")
    (data / "cat ").rename(data / "cat")
    again = scan_folder(data, seed=3, val_split=0.5, split_file=tmp_path / "run" / "split.json",
                        class_names=first.classes)
    trimmed = lambda items: [(p.replace(f"{os.sep}cat {os.sep}", f"{os.sep}cat{os.sep}"), y) for p, y in items]  # noqa: E731
    assert again.classes == first.classes and again.warnings == first.warnings
    assert (again.train.items, again.val.items) == (trimmed(first.train.items), trimmed(first.val.items))


def test_a_fresh_split_does_not_depend_on_the_unicode_form_of_names(tmp_path):
    """QA (session 18's note): the seeded split hashed each path as written, so the same folder with its
    names decomposed (a copy through macOS) held out other images: another validation set, other figures for
    the same data and seed. The hash takes the class_key (NFC) of the path now."""
    import unicodedata

    held_out = []
    for form in ("NFC", "NFD"):
        data = make_image_folder(tmp_path / form, classes=("élan", "fox"), per_class=12, size=16)
        for f in sorted(data.rglob("*.png")):
            f.rename(f.parent / unicodedata.normalize(form, f"é{f.name}"))
        (data / "élan").rename(data / unicodedata.normalize(form, "élan"))
        report = scan_folder(data, seed=3, val_split=0.25)
        held_out.append(sorted(unicodedata.normalize("NFC", report.relpath(p)) for p, _ in report.val.items))
    assert len(held_out[0]) == 6 and held_out[0] == held_out[1]


def test_a_split_file_keeps_both_files_whose_names_differ_only_in_unicode_form(tmp_path):
    """QA (helper-47): the split file matched files by class_key alone, so two images of one class named
    ``café.png`` composed and decomposed (two files on Linux) became one on the split's reuse: a resume or a
    re-scan with the run's split.json silently trained and validated on one image fewer."""
    import unicodedata

    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4, size=16)
    for form, src in (("NFC", "cat_000.png"), ("NFD", "cat_001.png")):
        (data / "cat" / src).rename(data / "cat" / unicodedata.normalize(form, "café.png"))
    first = scan_folder(data, seed=3, val_split=0.5)
    write_scan(first, tmp_path / "run")
    again = scan_folder(data, seed=3, val_split=0.5, split_file=tmp_path / "run" / "split.json")
    assert len(first.train.items) + len(first.val.items) == 8
    assert (again.train.items, again.val.items, again.warnings) == (first.train.items, first.val.items, [])


def test_split_file_files_changed(image_folder, tmp_path):
    first = scan_folder(image_folder)
    write_scan(first, tmp_path / "run")
    removed = first.val.items[0][0]
    os.unlink(removed)
    for i in range(3):
        make_image(image_folder / "dog" / f"new_{i}.png", 1)
    again = scan_folder(image_folder, split_file=tmp_path / "run" / "split.json")
    msg = [w for w in again.warnings if "changed since" in w]
    assert msg and "3 added" in msg[0] and "1 removed" in msg[0]
    old_val = {p for p, _ in first.val.items} - {removed}
    new_val = {p for p, _ in again.val.items}
    assert old_val <= new_val                      # unchanged files keep their side
    assert len(again.train) + len(again.val) == 36 - 1 + 3


def test_split_file_counts_a_file_moved_to_another_class_as_moved(image_folder, tmp_path):
    """QA (docs/guide/data.md: a resume reports files added, removed or relabelled): a class is its folder, so
    a relabelled file has a new path, and the warning said '1 added, 1 removed, 0 moved to another class'."""
    first = scan_folder(image_folder)
    write_scan(first, tmp_path / "run")
    os.rename(image_folder / "fox" / "fox_001.png", image_folder / "cat" / "fox_001.png")
    make_image(image_folder / "dog" / "new.png", 1)
    again = scan_folder(image_folder, split_file=tmp_path / "run" / "split.json")
    (msg,) = [w for w in again.warnings if "changed since" in w]
    assert "1 added, 0 removed" in msg and "1 moved to another class" in msg
    assert len(again.train) + len(again.val) == 36 + 1
    assert "cat/fox_001.png" in {again.relpath(p) for p, c in again.train.items + again.val.items if c == 0}


def test_a_move_is_found_below_the_scanned_folder_and_only_for_a_name_seen_once(tmp_path):
    """Review: a train/ + test/ folder (flat: val carved out of train/) had its split folder stripped instead
    of the class, so a real move counted as 1 added + 1 removed; and two files of one name moved the same
    way cannot be paired, so they stay added and removed."""
    root = tmp_path / "data"
    for ci, name in enumerate(("cat", "dog", "fox", "owl")):
        for i in range(6):
            make_image(root / "train" / name / f"{name}_{i:03d}.png", ci)
        make_image(root / "test" / name / "t.png", ci)
    for name in ("dog", "fox"):
        make_image(root / "train" / name / "s.png", 1)
    first = scan_folder(root)
    assert first.layout == "flat" and first.folders["train"] == "train"
    write_scan(first, tmp_path / "run")
    os.rename(root / "train" / "fox" / "fox_001.png", root / "train" / "cat" / "fox_001.png")
    (msg,) = [w for w in scan_folder(root, split_file=tmp_path / "run" / "split.json").warnings if "changed" in w]
    assert "0 added, 0 removed or now unreadable, 1 moved to another class" in msg, msg
    os.rename(root / "train" / "dog" / "s.png", root / "train" / "cat" / "s.png")
    os.rename(root / "train" / "fox" / "s.png", root / "train" / "owl" / "s.png")    # two of one name: ambiguous
    (msg,) = [w for w in scan_folder(root, split_file=tmp_path / "run" / "split.json").warnings if "changed" in w]
    assert "2 added, 2 removed or now unreadable, 1 moved to another class" in msg, msg


def test_no_validation_images_is_fatal(tmp_path):
    for c in range(2):
        make_image(tmp_path / "d" / f"c{c}" / "only.png", c)          # 1 image per class: nothing to hold out
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path / "d")
    assert str(info.value) == (f"each of the 2 class folders in {tmp_path / 'd'} holds a single image, so none can be "
                               "held out for validation: add images, 2 or more per class, or DIR/val/<class>/ images "
                               "to validate on")
    make_image(tmp_path / "s" / "train" / "c0" / "a.png", 0)
    make_image(tmp_path / "s" / "train" / "c1" / "b.png", 1)
    with pytest.raises(DataError) as info:     # train/ alone: the class folders are in DIR/train, not DIR
        scan_folder(tmp_path / "s")
    assert str(info.value).startswith(f"each of the 2 class folders in {tmp_path / 's' / 'train'} holds a single ")
    (tmp_path / "s" / "val").mkdir()                                # a val/ folder, empty: the split's own message
    with pytest.raises(DataError, match="no validation images in .*: add DIR/val/<class>/ images"):
        scan_folder(tmp_path / "s")


def test_a_class_without_validation_images_is_told_what_fixes_it_in_its_layout(tmp_path):
    """QA: a flat folder's one-image class was told to "add val/<class>/ images", a folder it does not have."""
    flat = make_image_folder(tmp_path / "flat", per_class=6)
    make_image(flat / "lonely" / "only.png", 1)
    (warning,) = [w for w in scan_folder(flat).warnings if "no validation images" in w]
    assert "2 or more images" in warning and "val/<class>/" not in warning
    split = make_image_folder(tmp_path / "split", layout="split", per_class=3, val_per_class=1)
    make_image(split / "train" / "extra" / "x.png", 1)
    make_image(split / "train" / "extra" / "y.png", 2)
    (warning,) = [w for w in scan_folder(split).warnings if "no validation images" in w]
    assert "add val/<class>/ images" in warning

def test_stray_folders_and_files_are_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", layout="split", per_class=3, val_per_class=1)
    make_image(root / "extras" / "x.png", 0)
    report = scan_folder(root)
    assert any("extras" in w for w in report.warnings) and len(report.train) == 9
    flat = make_image_folder(tmp_path / "f", per_class=3)
    make_image(flat / "loose.png", 0)
    assert any("directly in" in w for w in scan_folder(flat).warnings)


def test_folders_zoo_wrote_are_not_read_as_images_and_a_run_given_for_data_is_refused(tmp_path):
    """QA (h72): a run folder kept in the data folder (``runs/``), or an eval report inside a class folder, was
    read as images: its curves.png and confusion.png trained as a class ``runs``; ``--data RUN`` (a run folder
    with three eval reports) trained a 3-class model on their confusion.png. A folder holding the marker
    every zoo command writes first (``.zoo-run.json``) is zoo's output, never data."""
    from finetune.data.files import walk_files

    root = make_image_folder(tmp_path / "d", per_class=3)
    run = root / "runs" / "r1"
    for name in ("curves.png", "eval-a/confusion.png", "eval-b/confusion.png", "export/x.png"):
        make_image(run / name, 0)
    make_image(root / "cat" / "eval-c" / "confusion.png", 0)
    for folder in (run, run / "eval-a", run / "eval-b", root / "cat" / "eval-c"):
        (folder / ".zoo-run.json").write_text('{"kind": "eval"}')
    report = scan_folder(root)
    assert report.classes == ["cat", "dog", "fox"] and len(report.train) + len(report.val) == 9
    assert any("empty class folder(s) runs" in w for w in report.warnings) and not report.bad_files
    assert [Path(p).name for p in walk_files(str(root / "cat"))] == ["cat_000.png", "cat_001.png", "cat_002.png"]
    with pytest.raises(DataError, match=r"r1 is a folder zoo wrote \(a run, bundle or report\), not images to "
                                        r"learn from: pass --data the image folder"):
        scan_folder(run)


def test_files_outside_the_class_folders_of_a_split_layout_are_reported(tmp_path):
    """QA (docs/guide/data.md: files not in a class folder are ignored with a warning): an image dropped into
    train/ or val/ itself, or next to them, was left out without a word in a split layout."""
    root = make_image_folder(tmp_path / "d", layout="split", per_class=3, val_per_class=1)
    make_image(root / "train" / "loose.png", 0)
    make_image(root / "val" / "also.png", 1)
    report = scan_folder(root)
    (warning,) = [w for w in report.warnings if "outside the class folders" in w]
    assert warning.startswith("2 files") and "train/loose.png" in warning and "DIR/train/<class>/" in warning
    assert len(report.train) == 9 and len(report.val) == 3
    assert not [w for w in scan_folder(make_image_folder(tmp_path / "clean", layout="split", per_class=3,
                                                         val_per_class=1)).warnings if "outside" in w]


def test_jpegs_without_image_data_are_refused_by_the_scan_whatever_the_pillow(tmp_path):
    """Cut inside the Huffman tables, ending right after the headers, a scan header with nothing after
    it: refused by the scan's own marker walk (Pillow 12 refuses the first at open, Pillow 13 opens it),
    while a JPEG whose headers are whole but whose data cannot decode passes (the decoder meets it)."""
    import io

    import numpy as np

    from tests.conftest import corrupt_jpeg

    root = make_image_folder(tmp_path / "d", layout="split", per_class=3, val_per_class=1, size=32)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90)
    good = buf.getvalue()
    sos = good.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
    dht = good.index(b"\xff\xc4")        # cut 10 bytes into the first Huffman table, whatever precedes it
    cases = {"cut_in_tables.jpg": good[:dht + 10] + bytes(len(good) - dht - 12) + b"\xff\xd9",
             "headers_only.jpg": good[:sos] + b"\xff\xd9",
             "scan_header_only.jpg": good[:scan_start],
             "zero_length.jpg": good[:20] + b"\xff\xdb\x00\x00" + good[20:]}
    for name, data in cases.items():
        (root / "train" / "cat" / name).write_bytes(data)
    (root / "train" / "cat" / "bad_data.jpg").write_bytes(corrupt_jpeg(good))
    (root / "train" / "cat" / "good.jpg").write_bytes(good)
    report = scan_folder(root)
    refused = {Path(p).name: why for p, why in report.bad_files}
    assert set(refused) == set(cases), refused
    assert all(why.startswith("damaged JPEG") for why in refused.values()), refused
    kept = {Path(p).name for p, _ in report.train.items}
    assert {"bad_data.jpg", "good.jpg"} <= kept


def test_damaged_split_file(image_folder, tmp_path):
    bad = tmp_path / "split.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="delete it"):
        scan_folder(image_folder, split_file=bad)


def test_imbalance_warning(tmp_path):
    root = tmp_path / "d"
    for i in range(16):
        make_image(root / "many" / f"{i}.png", 0)
    for i in range(4):
        make_image(root / "few" / f"{i}.png", 1)
    report = scan_folder(root, val_split=0.25)
    assert report.imbalance() == pytest.approx(12 / 3)
    assert any("--class-weights auto" in w and "--sampler balanced" in w for w in report.warnings)


# ------------------------------------------------------------------------------------ transforms
def test_eval_transform_follows_data_config():
    cfg = dict(DATA_CONFIG, input_size=(3, 40, 48))
    t = build_transform(cfg, train=False)
    grey = Image.new("RGB", (100, 70), (128, 128, 128))
    out = t(grey)
    assert out.shape == (3, 40, 48) and out.dtype == torch.float32
    expected = [(128 / 255 - m) / s for m, s in zip(cfg["mean"], cfg["std"])]
    assert out.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-5)
    assert t.min_size == max(int(40 / 0.875), int(48 / 0.875))


def test_eval_transform_resizes_then_centre_crops():
    # A left half black / right half white image: after resize + centre crop the middle column is the edge.
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 255, 255), (32, 0, 64, 64))
    cfg = dict(DATA_CONFIG, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.5)
    out = build_transform(cfg, train=False)(im)      # resize to 64 (32 / 0.5), crop the central 32
    assert out.shape == (3, 32, 32)
    assert out[0, :, :12].max() < 0.05 and out[0, :, 20:].min() > 0.95


def test_train_transform_shape_and_randomness():
    t = build_transform(DATA_CONFIG, train=True, config=FinetuneConfig())
    im = load_image(make_image(Path(os.environ["ZOO_HOME"]) / "a.png", 1, size=48))
    torch.manual_seed(0)
    outs = [t(im) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("config", [FinetuneConfig(augment="none"), ALL_OFF])
def test_augmentation_off_equals_eval(config, tmp_path):
    im = load_image(make_image(tmp_path / "a.png", 2, size=48))
    train, ev = build_transform(DATA_CONFIG, True, config), build_transform(DATA_CONFIG, False)
    assert torch.equal(train(im), ev(im))


def test_each_augmentation_switch(tmp_path):
    im = load_image(make_image(tmp_path / "a.png", 1, size=48))
    ev = build_transform(DATA_CONFIG, False)(im)
    flip = build_transform(DATA_CONFIG, True, ALL_OFF.replace(hflip=1.0))
    assert torch.equal(flip(im), ev.flip(-1))
    names = lambda cfg: [type(s).__name__ for s in build_transform(DATA_CONFIG, True, cfg).pipeline.transforms]
    assert "RandomResizedCrop" in names(ALL_OFF.replace(crop_scale_min=0.5))
    assert "RandomResizedCrop" not in names(ALL_OFF)
    assert "ColorJitter" in names(ALL_OFF.replace(brightness=0.3))
    assert "ColorJitter" not in names(ALL_OFF) and "RandomHorizontalFlip" not in names(ALL_OFF)
    # Brightness only: geometry is fixed, so the jittered image is the eval image scaled in pixel space.
    bright = build_transform(dict(DATA_CONFIG, mean=(0, 0, 0), std=(1, 1, 1)), True, ALL_OFF.replace(brightness=0.5))
    plain = build_transform(dict(DATA_CONFIG, mean=(0, 0, 0), std=(1, 1, 1)), False)(im)
    torch.manual_seed(1)
    outs = [bright(im) for _ in range(3)]
    assert any(not torch.allclose(o, plain) for o in outs)
    assert all(o.shape == plain.shape for o in outs)


def test_bad_data_config():
    with pytest.raises(ConfigError, match="mean"):
        build_transform({"input_size": (3, 32, 32), "std": (1, 1, 1)}, train=False)
    with pytest.raises(ConfigError, match="interpolation"):
        build_transform(dict(DATA_CONFIG, interpolation="sharpest"), train=False)


# --------------------------------------------------- uint8 batches normalised on the device
def _uint8_tolerance(data_config, levels: int = 1) -> float:
    return levels / 255 / min(data_config["std"]) + 1e-6   # ``levels`` uint8 steps after normalisation


def _levels(x: torch.Tensor, ref: torch.Tensor, data_config) -> torch.Tensor:
    """|x - ref| of two normalised images, in uint8 levels."""
    return (x - ref).abs() * torch.tensor(data_config["std"]).view(-1, 3, 1, 1).squeeze(0) * 255


@pytest.mark.parametrize("train", [True, False])
def test_uint8_output_matches_float_path(tmp_path, train):
    """Same image, same seed: uint8 transform + DeviceNormalize == the float transform (augmentation
    included: the same random draws). The uint8 pipeline runs torch's kernels on tensors, the float one
    PIL's on images: equal to 2 levels (jitter rounding), on average far below one level."""
    im = load_image(make_image(tmp_path / "a.png", 1, size=48))
    config = FinetuneConfig(crop_scale_min=0.35, hflip=0.5, brightness=0.4, contrast=0.4)
    fl = build_transform(DATA_CONFIG, train, config)
    u8 = build_transform(DATA_CONFIG, train, config, output="uint8")
    norm = DeviceNormalize.from_data_config(DATA_CONFIG)
    for seed in range(6):
        torch.manual_seed(seed)
        a = fl(im)
        torch.manual_seed(seed)
        b = u8(im)
        assert b.dtype == torch.uint8 and b.shape == a.shape
        x = norm(b.unsqueeze(0), "cpu")[0]
        assert x.dtype == torch.float32
        diff = _levels(x, a, DATA_CONFIG)
        assert float(diff.max()) <= 2.0 + 1e-4 and float(diff.mean()) < 0.5


def test_load_image_tensor_equals_load_image(tmp_path):
    """Plain JPEGs through decode_jpeg, everything else through PIL: the same pixels as load_image."""
    import numpy as np

    rgb = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    paths = {"plain.jpg": ("JPEG", rgb), "grey.jpg": ("JPEG", rgb.convert("L")), "x.png": ("PNG", rgb),
             "prog.jpg": ("JPEG", rgb), "cmyk.jpg": ("JPEG", rgb.convert("CMYK"))}
    for name, (fmt, im) in paths.items():
        im.save(tmp_path / name, fmt, **({"progressive": True} if name == "prog.jpg" else {}))
        ref = torch.from_numpy(np.array(load_image(tmp_path / name))).permute(2, 0, 1)
        got = load_image_tensor(tmp_path / name)
        assert got.dtype == torch.uint8 and got.shape == ref.shape, name
        assert int((got.int() - ref.int()).abs().max()) <= 1, name      # libjpeg-turbo both sides
    with pytest.raises(DataError):
        load_image_tensor(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DataError):
        load_image_tensor(tmp_path / "bad.jpg")


@pytest.mark.parametrize("interp", ["box", "hamming"])
def test_uint8_path_keeps_pil_for_resizes_torch_lacks(tmp_path, interp):
    """torch has no box/hamming resize: those uint8 pipelines stay on PIL images (no per-image failures)."""
    config = {**DATA_CONFIG, "interpolation": interp}
    for train in (True, False):
        tf = build_transform(config, train, output="uint8")
        assert not tf.tensor_input
        report = scan_folder(make_image_folder(tmp_path / f"{interp}{train}", per_class=3), val_split=0.34)
        ds = ImageDataset(report.train, tf)
        items = [ds[i] for i in range(len(ds))]
        assert all(x is not None and x[0].dtype == torch.uint8 and x[0].shape == (3, 32, 32) for x in items)
    assert build_transform(DATA_CONFIG, False, output="uint8").tensor_input
    assert not build_transform(DATA_CONFIG, False).tensor_input


def test_uint8_loader_batches_match_float_loader(image_folder):
    report = scan_folder(image_folder)
    config = FinetuneConfig(brightness=0.3, contrast=0.3)
    norm = DeviceNormalize.from_data_config(DATA_CONFIG)

    def batches(output):
        torch.manual_seed(3)
        ds = ImageDataset(report.train, build_transform(DATA_CONFIG, True, config, output=output))
        return list(make_loader(ds, 4, train=True, workers=0, seed=7))

    for (xf, yf), (xu, yu) in zip(batches("float"), batches("uint8")):
        assert xu.dtype == torch.uint8 and torch.equal(yf, yu)
        out = norm(xu, "cpu", channels_last=True)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert float((out - xf).abs().max()) <= _uint8_tolerance(DATA_CONFIG, levels=2)


def test_evaluate_with_device_normalize_equals_float(image_folder):
    from finetune.engine import evaluate

    report = scan_folder(image_folder)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(output, normalize):
        ds = ImageDataset(report.val, build_transform(DATA_CONFIG, False, output=output))
        return evaluate(model, make_loader(ds, 4, train=False, workers=0), loss_fn, torch.device("cpu"),
                        report.classes, normalize=normalize)

    a = run("float", None)
    b = run("uint8", DeviceNormalize.from_data_config(DATA_CONFIG))
    assert a["confusion"] == b["confusion"] and b["loss"] == pytest.approx(a["loss"], abs=1e-3)


def test_uint8_output_options():
    assert "output=" not in repr(build_transform(DATA_CONFIG, False))    # float repr: feature-cache keys kept
    assert "output=uint8" in repr(build_transform(DATA_CONFIG, False, output="uint8"))
    with pytest.raises(ConfigError, match="output"):
        build_transform(DATA_CONFIG, False, output="half")
    with pytest.raises(TypeError, match="uint8"):
        DeviceNormalize((0, 0, 0), (1, 1, 1))(torch.zeros(1, 3, 4, 4), "cpu")


# ------------------------------------------- flip + colour jitter on the device (the CUDA default)
def test_colour_on_device_leaves_flip_and_jitter_to_device_augment(tmp_path):
    """Workers crop and resize only; DeviceAugment's flip then gives the worker pipeline's own output."""
    from torchvision.transforms import v2 as T

    im = Image.linear_gradient("L").rotate(90).resize((48, 40)).convert("RGB")   # dark left, light right
    config = FinetuneConfig(crop_scale_min=0.35, hflip=0.5, brightness=0.4, contrast=0.4)
    worker = build_transform(DATA_CONFIG, True, config, output="uint8", colour_on_device=True)
    names = [type(t).__name__ for t in worker.pipeline.transforms]
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" not in names and "ColorJitter" not in names
    for name, t in (("RandomHorizontalFlip", T.RandomHorizontalFlip), ("ColorJitter", T.ColorJitter)):
        assert any(isinstance(s, t) for s in build_transform(DATA_CONFIG, True, config, output="uint8")
                   .pipeline.transforms), name
    # no random crop, flip always: worker (no flip) + DeviceAugment == the worker pipeline with the flip
    flip_only = FinetuneConfig(crop_scale_min=1.0, hflip=1.0, brightness=0.0, contrast=0.0)
    ref = build_transform(DATA_CONFIG, True, flip_only, output="uint8")(im)
    base = build_transform(DATA_CONFIG, True, flip_only, output="uint8", colour_on_device=True)(im)
    assert not torch.equal(base, ref) and torch.equal(base.flip(-1), ref)
    aug = DeviceAugment.from_config(DATA_CONFIG, flip_only)
    norm = DeviceNormalize.from_data_config(DATA_CONFIG)
    assert torch.equal(aug(base.unsqueeze(0), "cpu"), norm(ref.unsqueeze(0), "cpu"))
    with pytest.raises(ConfigError, match="uint8"):
        build_transform(DATA_CONFIG, True, config, colour_on_device=True)


def test_a_failed_image_changes_no_other_images_device_augmentation(tmp_path):
    """QA (helper-45): on CUDA the workers crop (seeded per image by (epoch seed, index)) and DeviceAugment
    flipped and jittered the batch from one stream by position: after an image that failed to load, every
    later image of the epoch got another image's flip and factors, and under torchrun a rank that lost an
    image kept the wrong rows of the global draws. The batches carry their dataset indices now, and each image
    draws from (epoch seed, its index): with a file broken, the others come out as they did."""
    from finetune.engine.runtime import to_device

    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=4, size=40)
    items = [(str(p), int(p.parent.name == "b")) for p in sorted(data.rglob("*.png"))]
    config = FinetuneConfig(crop_scale_min=0.5, hflip=0.5, brightness=0.4, contrast=0.4)
    ds = ImageDataset(ImageSet(items, ["a", "b"]),
                      build_transform(DATA_CONFIG, True, config, output="uint8", colour_on_device=True))
    aug = DeviceAugment.from_config(DATA_CONFIG, config)

    def augmented(keys, rank=0, world=1):
        aug.reseed(1234, rank, world)
        batch = collate_skip_none([ds[(i, 99)] for i in keys])     # (index, epoch seed): the workers' keys
        return to_device(*batch[:2], torch.device("cpu"), False, aug, *batch[2:3])[0]

    whole = augmented(range(8))
    plain = DeviceNormalize(DATA_CONFIG["mean"], DATA_CONFIG["std"])
    assert not torch.equal(whole, plain(collate_skip_none([ds[(i, 99)] for i in range(8)])[0], "cpu"))  # it augmented
    Path(items[2][0]).write_bytes(b"broken since the scan")
    kept = [0, 1, 3, 4, 5, 6, 7]
    assert torch.equal(augmented(range(8)), whole[kept])
    assert torch.equal(augmented([1, 3, 5, 7], rank=1, world=2), whole[[1, 3, 5, 7]])   # a rank's share
    assert torch.equal(augmented([0, 4, 6], rank=0, world=2), whole[[0, 4, 6]])         # ... short of one


def test_each_repeat_of_an_image_in_an_epoch_is_augmented_anew(tmp_path):
    """QA (session 18's note): --sampler balanced draws rare images several times an epoch, and every repeat
    was seeded by (epoch seed, index) alone, so each copy had the same crop, flip and jitter, pixel for pixel,
    in the workers and on the device: oversampling repeated one picture. The k-th repeat now draws from
    ``repeat_seed(epoch seed, k)``; first draws (every draw of the random sampler) keep the epoch seed."""
    from finetune.core.seeding import repeat_seed
    from finetune.data.decode import EncodedImageDataset
    from finetune.data.loaders import EpochSeededSampler

    sampler = EpochSeededSampler([3, 5, 3, 3, 1])
    sampler.set_epoch(0, 99)
    keys = list(sampler)
    assert keys == [(3, 99), (5, 99), (3, repeat_seed(99, 1)), (3, repeat_seed(99, 2)), (1, 99)]
    assert len({seed for _, seed in keys}) == 3
    assert list(sampler) == keys                  # a function of the epoch seed: the same pass again

    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3, size=40)
    image_set = ImageSet([(str(p), int(p.parent.name == "b")) for p in sorted(data.rglob("*.png"))], ["a", "b"])
    config = FinetuneConfig(crop_scale_min=0.5, hflip=0.5, brightness=0.4, contrast=0.4)
    repeats = (0, 2, 3)                            # the positions of image 3's three draws
    views = [ImageDataset(image_set, build_transform(DATA_CONFIG, True, config))[keys[k]][0] for k in repeats]
    assert not any(torch.equal(views[a], views[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    # CUDA's default path: the worker crops (per key, as above), DeviceAugment flips and jitters per sample key
    ds = ImageDataset(image_set, build_transform(DATA_CONFIG, True, config, output="uint8", colour_on_device=True))
    batch = collate_skip_none([ds[k] for k in keys])
    assert batch[2][0] == sample_seed(99, 3)       # a first draw: the key it always had
    _flips, ops = DeviceAugment.from_config(DATA_CONFIG, config).draws_for(batch[2].tolist())
    assert len({tuple(ops[k]) for k in repeats}) == 3
    # --decode device: the encoded files carry the same sample keys to the device's crop and colour draws
    encoded = EncodedImageDataset(image_set)
    assert [encoded[k][3] for k in keys] == batch[2].tolist()


def test_device_augment_draws_follow_color_jitter():
    """Factors in ColorJitter's ranges, both orders, flips at the given rate; reseeded = the same draws;
    eval and augment="none" do nothing but normalise."""
    config = FinetuneConfig(hflip=0.5, brightness=0.4, contrast=0.2, seed=3)
    aug = DeviceAugment.from_config(DATA_CONFIG, config)
    assert aug.active and (aug.hflip, aug.brightness, aug.contrast) == (0.5, 0.4, 0.2)
    aug.reseed(11)
    flips, ops = aug.draw(400)
    aug.reseed(11)
    assert aug.draw(400) == (flips, ops)
    assert 150 < sum(flips) < 250
    assert {tuple(k for k, _ in o) for o in ops} == {("b", "c"), ("c", "b")}
    assert all(0.6 <= f <= 1.4 for o in ops for k, f in o if k == "b")
    assert all(0.8 <= f <= 1.2 for o in ops for k, f in o if k == "c")
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug.reseed(1)
    a = aug(x, "cpu")
    aug.reseed(1)
    assert torch.equal(aug(x, "cpu"), a)
    assert not torch.equal(aug(x, "cpu"), a)                      # the generator moves on
    plain = DeviceNormalize.from_data_config(DATA_CONFIG)(x, "cpu")
    for off in (DeviceAugment.from_config(DATA_CONFIG, config, train=False),
                DeviceAugment.from_config(DATA_CONFIG, config.replace(augment="none"))):
        assert not off.active and torch.equal(off(x, "cpu"), plain)
    with pytest.raises(ConfigError, match="hflip"):
        DeviceAugment((0, 0, 0), (1, 1, 1), hflip=1.5)


def test_fit_leaves_colour_to_the_device_on_cuda_only():
    from finetune.data import device_steps

    config = FinetuneConfig()
    assert device_steps(config, DATA_CONFIG, torch.device("cpu")) == ("float", None, None)
    output, norm, aug = device_steps(config, DATA_CONFIG, torch.device("cuda"))
    assert output == "uint8" and type(norm) is DeviceNormalize and isinstance(aug, DeviceAugment) and aug.active
    assert device_steps(config.replace(gpu_normalize=False), DATA_CONFIG, torch.device("cuda")) == \
        ("float", None, None)
    assert device_steps(config.replace(decode="device"), DATA_CONFIG, torch.device("cuda")) == \
        ("uint8", None, None)                                    # finetune.data.decode does all of it


def test_train_epoch_with_device_augment_is_reseedable(image_folder):
    """train_one_epoch over uint8 batches + DeviceAugment: the same epoch seed gives the same weights; another
    epoch seed of the samples (the same order) other flips and jitter, so other weights."""
    from finetune.engine import train_one_epoch

    report = scan_folder(image_folder)
    config = FinetuneConfig(hflip=0.5, brightness=0.4, contrast=0.4)
    ds = ImageDataset(report.train, build_transform(DATA_CONFIG, True, config, output="uint8",
                                                    colour_on_device=True))
    aug = DeviceAugment.from_config(DATA_CONFIG, config)

    def epoch(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = make_loader(ds, 4, train=True, workers=0, seed=7)     # the order: seed 7, epoch 0
        loader.sampler.set_epoch(0, seed)                              # the samples' keys: epoch seed ``seed``
        out = train_one_epoch(model, loader, opt, None, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                              normalize=aug)
        return out, torch.cat([p.detach().flatten() for p in model.parameters()])

    (a, wa), (_, wb), (_, wc) = epoch(5), epoch(5), epoch(6)
    assert a["images"] == len(ds)          # 30 at batch 4: the last 2 (7%) train too (drop_last_partial)
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_augment_on_cuda_equals_cpu():
    aug = DeviceAugment((0.2, 0.4, 0.6), (0.5, 0.25, 0.1), hflip=0.5, brightness=0.4, contrast=0.4)
    x = torch.randint(0, 256, (32, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug.reseed(2)
    cpu = aug(x, "cpu")
    aug.reseed(2)
    gpu = aug(x.pin_memory(), "cuda", channels_last=True)
    assert gpu.is_cuda and gpu.is_contiguous(memory_format=torch.channels_last)
    assert float((gpu.cpu() - cpu).abs().max()) <= _uint8_tolerance(DATA_CONFIG)   # a level at most


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_normalize_on_cuda(tmp_path):
    im = load_image(make_image(tmp_path / "a.png", 1, size=48))
    config = FinetuneConfig(brightness=0.4, contrast=0.4)
    torch.manual_seed(0)
    a = build_transform(DATA_CONFIG, True, config)(im)
    torch.manual_seed(0)
    b = build_transform(DATA_CONFIG, True, config, output="uint8")(im)
    x = DeviceNormalize.from_data_config(DATA_CONFIG)(b.unsqueeze(0).pin_memory(), "cuda", channels_last=True)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    assert float((x[0].cpu() - a).abs().max()) <= _uint8_tolerance(DATA_CONFIG, levels=2)


# ------------------------------------------------------------------------------- dataset/loaders
def test_loader_yields_batches(image_folder):
    report = scan_folder(image_folder)
    ds = ImageDataset(report.train, build_transform(DATA_CONFIG, True))
    loader = make_loader(ds, 4, train=True, workers=0, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert len(loader) == -(-len(report.train) // 4)      # 30 at batch 4: the partial batch (2, 7%) is kept
    labels_a = [y.tolist() for _, y in make_loader(ds, 4, train=True, workers=0, seed=5)]
    labels_b = [y.tolist() for _, y in make_loader(ds, 4, train=True, workers=0, seed=5)]
    assert labels_a == labels_b                            # seeded
    ev = make_loader(ImageDataset(report.val, build_transform(DATA_CONFIG, False)), 4, train=False, workers=0)
    assert sum(len(y) for _, y in ev) == len(report.val)


def test_loader_with_a_worker_records_failures(image_folder):
    report = scan_folder(image_folder)
    items = list(report.val.items[:3])
    broken = image_folder / "cat" / "broken.png"
    broken.write_bytes(b"not a png at all")
    items.insert(1, (str(broken), 0))
    ds = ImageDataset(ImageSet(items, report.classes), build_transform(DATA_CONFIG, False))
    loader = make_loader(ds, 2, train=False, workers=1)
    sizes = [len(y) for _, y in loader]
    assert sizes == [1, 2]                  # the broken image is dropped from its batch, nothing else
    assert [p for p, _ in ds.failures()] == [str(broken)]


def test_a_seeded_sample_draws_from_the_cpu_generator_only(image_folder, monkeypatch):
    """Each sample's augmentation is seeded from (epoch seed, index) on torch's CPU generator: the same
    draws as torch.manual_seed gives it, but the CUDA generators (dropout on the GPU) are never reseeded,
    and no lazy CUDA seeding with its stack trace is queued per image (docs/benchmarks.md)."""
    report = scan_folder(image_folder)
    ds = ImageDataset(report.train, build_transform(DATA_CONFIG, True, FinetuneConfig()))
    key = (3, 12345)
    torch.manual_seed(sample_seed(12345, 3))
    expected = ds._load(3, 0)[0]                        # what the sample drew, seeded the old way
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    before = torch.get_rng_state()
    got = ds[key][0]
    assert torch.equal(got, expected) and calls == []
    assert torch.equal(torch.get_rng_state(), before)   # the main process's stream is restored
    assert not torch.equal(ds[(3, 54321)][0], got)       # another epoch seed, other draws


def test_collate_skip_none():
    x = (torch.zeros(3), 1)
    assert collate_skip_none([None, None]) is None
    images, labels = collate_skip_none([x, None, x])
    assert images.shape == (2, 3) and labels.tolist() == [1, 1]


def test_balanced_sampler_and_class_weights(tmp_path):
    items = [(f"a{i}.png", 0) for i in range(30)] + [(f"b{i}.png", 1) for i in range(10)]
    image_set = ImageSet(items, ["a", "b"])
    assert class_weights(image_set) == pytest.approx([0.5, 1.5])
    loader = make_loader(ImageDataset(image_set), 8, train=True, workers=0, sampler="balanced", seed=0)
    assert isinstance(loader.sampler.sampler, torch.utils.data.WeightedRandomSampler)   # seeded per epoch
    drawn = Counter()
    for _ in range(10):
        drawn.update(image_set.items[i][1] for i, _seed in loader.sampler)
    assert abs(drawn[0] / (drawn[0] + drawn[1]) - 0.5) < 0.08     # 75/25 data sampled about 50/50
    two = make_loader(ImageDataset(image_set), 8, train=True, workers=0, sampler="balanced", world_size=2, rank=1)
    assert len(two.sampler) == 20          # its half of one global draw (test_balanced_ranks_share_the_one_process_draw)
    with pytest.raises(ConfigError, match="invalid sampler"):
        make_loader(ImageDataset(image_set), 8, train=True, sampler="weighted")


def test_resolve_workers(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3 and resolve_workers(3, "cuda") == 3
    assert 0 <= resolve_workers(-1) <= 8
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    assert resolve_workers(-1) == 4                    # CPU training: a worker takes a core from it
    assert resolve_workers(-1, "cuda") == 15           # a GPU is fed by every core but the main one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers(-1, "cuda") == 3            # torchrun: the node's cores are shared by 4 ranks
    assert resolve_workers(-1, "cuda:1") == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(2)))
    assert resolve_workers(-1) == 0                    # 2 cores: both train, the main process decodes
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))
    assert resolve_workers(-1) == 8
    # scaled to the work: never more workers than one pass has batches; a number given is kept
    assert resolve_workers(-1, "cuda", batches=3) == 3 and resolve_workers(-1, "cuda", batches=0) == 0
    assert resolve_workers(-1, "cuda", batches=1000) == 63 and resolve_workers(12, "cuda", batches=3) == 12
    # a single pass over a few images (a small folder's feature pass) decodes in the main process
    assert resolve_workers(-1, "cuda", batches=2, single_pass_images=63) == 0
    assert resolve_workers(-1, "cuda", batches=40, single_pass_images=10_240) == 40
    assert resolve_workers(4, "cuda", batches=2, single_pass_images=63) == 4


@pytest.mark.parametrize("cores,local,workers", [(32, 4, 2), (64, 4, 4), (64, 2, 8), (16, 4, 0), (3, 8, 0)])
def test_resolve_workers_on_the_cpu_takes_this_processs_share_of_the_node(monkeypatch, cores, local, workers):
    """helper-97: under torchrun on CPU processes (gloo) every rank took the auto worker count of the whole
    machine (4 ranks on 32 cores: 8 workers each, 32 decoding processes beside 4 training ones); the CPU
    rule now reads the node's cores divided between its processes, as the CUDA rule does."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert resolve_workers(-1, "cpu") == workers
    assert resolve_workers(2, "cpu") == 2                      # a number given is kept


def test_loaders_start_no_more_workers_than_batches(image_folder, monkeypatch):
    """A 2-batch pass on a 16-core GPU host gets 2 worker processes, not 15; close_loader stops them."""
    report = scan_folder(image_folder)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    ds = ImageDataset(report.val, build_transform(DATA_CONFIG, False))
    loader = make_loader(ds, (len(ds) + 1) // 2, train=False, workers=-1, device="cuda")
    assert loader.num_workers == 2
    assert sum(len(y) for _, y in loader) == len(ds)
    assert loader._iterator is not None            # persistent workers, alive until closed
    close_loader(loader)
    close_loader(loader)
    assert loader._iterator is None
    assert sum(len(y) for _, y in loader) == len(ds)   # still usable: new workers
    close_loader(loader)


@pytest.mark.parametrize("fmt,ext,mode", [("JPEG", "jpg", "L"), ("PNG", "png", "RGBA"), ("WEBP", "webp", "RGB"),
                                          ("BMP", "bmp", "RGB"), ("TIFF", "tif", "RGB"), ("GIF", "gif", "P")])
def test_load_image_formats(tmp_path, fmt, ext, mode):
    path = tmp_path / f"x.{ext}"
    Image.new(mode, (20, 12), 200 if mode in ("L", "P") else (200, 100, 50, 255)[: len(mode)]).save(path, fmt)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (20, 12)


def test_load_image_draft_keeps_target_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (10, 120, 200)).save(path, quality=80)
    assert load_image(path).size == (2000, 1500)
    small = load_image(path, min_size=256)
    assert min(small.size) >= 256 and small.size[0] < 2000      # decoded at reduced scale, never below 256


@pytest.mark.parametrize("output", ["float", "uint8"])
def test_training_views_of_a_big_jpeg_are_decoded_large_enough_for_the_smallest_random_crop(tmp_path, output):
    # A 2400x1800 JPEG: decoded for the default crops (80%+ of the area) at 1/4 scale (600x450, above the
    # evaluation's 256); for timm's 0.08 at 1/2 (1200x900): at 1/4 its smallest crops (~170 px) were enlarged.
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (10, 120, 200)).save(path, quality=80)
    cfg = dict(DATA_CONFIG, input_size=(3, 224, 224), crop_pct=0.875)
    default = build_transform(cfg, train=True, config=FinetuneConfig(), output=output)
    wide = build_transform(cfg, train=True, config=FinetuneConfig(crop_scale_min=0.08), output=output)
    assert default.min_size == 256 and wide.min_size == 792          # ceil(224 / sqrt(0.08))
    assert build_transform(cfg, train=False, config=FinetuneConfig(crop_scale_min=0.08)).min_size == 256
    assert load_image(path, default.min_size).size == (600, 450)
    assert load_image(path, wide.min_size).size == (1200, 900)


def test_drop_last_rule():
    from finetune.data import drop_last_partial

    assert not drop_last_partial(48, 32)        # 16 of 48 left out each epoch: kept
    assert not drop_last_partial(30, 4)         # 2 of 30 (7%): kept
    assert drop_last_partial(1000, 32)          # 8 of 1000 (0.8%): dropped
    assert drop_last_partial(33, 32)            # a batch of one image breaks BatchNorm in train mode
    assert not drop_last_partial(64, 32) and not drop_last_partial(20, 32)


@pytest.mark.parametrize("n,batch,world", [(63, 4, 2), (67, 8, 2), (143, 8, 2), (1077, 128, 2), (1000, 32, 4),
                                            (24, 8, 2), (61, 8, 2), (3, 8, 2)])
def test_ranks_take_the_one_process_batches(n, batch, world):
    """QA: each rank applied the drop-last rule to its own shard and batch, so N processes took another number
    of steps per epoch than one (63 images at batch 4 on 2 ranks: 16 steps, one process 15; 1077 at 128: 9
    against 8), and so another LR schedule. The rule is decided on the global batch: step k of every rank
    together is one process's batch k (the last, when kept, with the few images the padding repeats)."""
    from finetune.data import drop_last_partial, set_epoch_order, train_batches

    class Sized:
        def __len__(self):
            return n

    def batches(ranks, rank):
        order = train_batches(Sized(), batch // ranks, seed=5, world_size=ranks, rank=rank)
        set_epoch_order(order.sampler, 5, 3)
        assert len(order) == len(list(order))
        return [[i for i, _seed in b] for b in order]

    one, shares = batches(1, 0), [batches(world, r) for r in range(world)]
    assert {len(s) for s in shares} == {len(one)}
    together = [sorted(sum((s[k] for s in shares), [])) for k in range(len(one))]
    kept = one and len(one[-1]) < batch
    assert together[:len(one) - kept] == [sorted(b) for b in one[:len(one) - kept]]
    if kept:
        assert set(one[-1]) <= set(together[-1]) and len(together[-1]) - len(one[-1]) < world
    # a last batch that would leave a rank one image is dropped under torchrun (BatchNorm runs per rank)
    assert drop_last_partial(26, 8) is False and drop_last_partial(26, 8, 2) is True


@pytest.mark.parametrize("n,batch,world", [(63, 4, 2), (67, 8, 2), (1000, 32, 4), (61, 8, 2), (3, 8, 2)])
def test_balanced_ranks_share_the_one_process_draw(n, batch, world):
    """--sampler balanced was refused under torchrun (a weighted draw per rank would not split one epoch). Every
    rank now draws the same global order and takes its strided share, repeats counted on the whole order: step k
    of the ranks together is one process's batch k, each sample with the key (and so the augmentation) it has
    in one process; another epoch draws anew."""
    from finetune.data import set_epoch_order, train_batches

    class Imbalanced:
        targets = [0 if i < n // 2 else 1 + i % 3 for i in range(n)]

        def __len__(self):
            return n

    def batches(ranks, rank, epoch=3):
        order = train_batches(Imbalanced(), batch // ranks, sampler="balanced", seed=5, world_size=ranks, rank=rank)
        set_epoch_order(order.sampler, 5, epoch)
        got = [list(b) for b in order]
        assert len(order) == len(got)
        return got

    one, shares = batches(1, 0), [batches(world, r) for r in range(world)]
    assert {len(s) for s in shares} == {len(one)}
    together = [sorted(sum((s[k] for s in shares), [])) for k in range(len(one))]
    kept = one and len(one[-1]) < batch
    assert together[:len(one) - kept] == [sorted(b) for b in one[:len(one) - kept]]
    if kept:       # the last partial batch, padded to a whole row of ranks with further draws of its first images
        assert set(one[-1]) <= set(together[-1]) and len(together[-1]) - len(one[-1]) < world
    assert batches(world, 0) == shares[0] and batches(world, 0, epoch=4) != shares[0]


@pytest.mark.parametrize("sampler", ["random", "balanced"])
def test_the_global_order_of_n_processes_takes_their_steps(sampler):
    """``processes``: the batches that N ranks' loaders take together, in one order (the cached head under
    torchrun). 18 images at batch 8 leave 2: one process keeps them, two drop them (a rank would train on one
    image); the head took 3 steps against the loaders' 2, which its LR schedule counted (QA, session 19)."""
    from finetune.data import set_epoch_order, train_batches

    class Targets:
        targets = [i % 3 for i in range(18)]

        def __len__(self):
            return 18

    def batches(order):
        set_epoch_order(order.sampler, 5, 2)
        return [list(b) for b in order]

    glob = batches(train_batches(Targets(), 8, sampler=sampler, seed=5, processes=2))
    ranks = [batches(train_batches(Targets(), 4, sampler=sampler, seed=5, world_size=2, rank=r)) for r in (0, 1)]
    assert len(glob) == len(ranks[0]) == len(ranks[1]) == 2
    assert [sorted(b) for b in glob] == [sorted(a + b) for a, b in zip(*ranks)]
    assert len(batches(train_batches(Targets(), 8, sampler=sampler, seed=5))) == 3     # one process keeps them


def test_small_training_set_trains_on_every_image_each_epoch(tmp_path):
    """48 images at batch 32: each epoch trains on all 48 (two steps), not on 32 (one)."""
    from finetune.engine import train_one_epoch

    make = ImageSet([(str(p), i % 3) for i, p in enumerate(_pngs(tmp_path, 48))], ["a", "b", "c"])
    ds = ImageDataset(make, build_transform(DATA_CONFIG, True, FinetuneConfig()))
    loader = make_loader(ds, 32, train=True, workers=0, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = train_one_epoch(model, loader, opt, None, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert out["images"] == 48 and len(loader) == 2


def _pngs(root, n):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"{i}.png"
        Image.new("RGB", (40, 40), (i * 5 % 256, 80, 160)).save(p)
        paths.append(p)
    return paths


def test_many_files_are_checked_in_parallel_runs_with_each_reason_at_its_own_file(tmp_path):
    """Above 64 files the checks run in threads, a run of files per task: the same reasons, in order, as
    one at a time; a JPEG with camera data after its end marker is kept, a cut one is not."""
    from finetune.data.files import _check_file, check_files

    make_image(tmp_path / "a.jpg", 0)
    good = (tmp_path / "a.jpg").read_bytes()
    paths = []
    for i in range(150):
        p = tmp_path / f"{i:03d}.jpg"
        kind = i % 5
        p.write_bytes(good if kind == 0 else good + b"\0" * 4000 if kind == 1 else good[: len(good) * 2 // 3]
                      if kind == 2 else b"" if kind == 3 else b"not an image")
        paths.append(str(p))
    reasons = check_files(paths)
    assert reasons == [_check_file(p) for p in paths]
    assert [r is None for r in reasons[:5]] == [True, True, False, False, False]
    assert reasons[3] == "empty file (0 bytes)"


def test_a_ctrl_c_stops_the_scan_file_checks_without_checking_the_rest(tmp_path, monkeypatch):
    """The scan's file checks run on finetune.core.threads.ordered_map, as the doctor's file pass does (helper-90:
    they had a pool of their own, whose map cancelled the runs not started just the same): a Ctrl-C drops the runs
    not started and waits only for those being checked; no thread outlives the scan."""
    import threading

    from finetune.core import threads
    from finetune.data import files

    paths = [str(tmp_path / f"{i:04d}.png") for i in range(20 * files._CHECK_RUN)]
    gate, checked = threading.Event(), []

    def check(path):    # the first file is the Ctrl-C; every other run waits until the pool is told to stop
        if path == paths[0]:
            raise KeyboardInterrupt
        if paths.index(path) >= files._CHECK_RUN and not gate.wait(10):
            gate.set()      # (a pool never told to stop: the rest go on, to be counted)
        checked.append(path)
        return None

    class Pool(threads.ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            gate.set()
            super().shutdown(wait=wait)

    monkeypatch.setattr(files, "_check_file", check)
    monkeypatch.setattr(threads, "ThreadPoolExecutor", Pool)
    with pytest.raises(KeyboardInterrupt):
        files.check_files(paths)
    # the first run, and at most the runs the 8 threads had started when it stopped
    assert len(checked) <= (1 + files.CHECK_THREADS) * files._CHECK_RUN < len(paths) - 1
    assert not [t for t in threading.enumerate() if t.name.startswith("zoo-scan-files")]


def test_a_memo_of_file_checks_spares_unchanged_files_and_rechecks_changed_ones(tmp_path, monkeypatch):
    """scan_folder(memo=...): a second scan opens no unchanged file found fine and gives the same report; a
    file damaged, zero-filled (its times set back) or mended since is checked again (its size or change time
    moved); a file found unusable is checked at every scan (a read error may pass); one changed within the
    last 2 s is not remembered (a coarse clock); a memo made with another Pillow, bomb limit or format, or
    damaged, or in a folder that cannot be written, is not used."""
    from finetune.data import files

    make_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=4, size=16)
    memo = tmp_path / "cache" / "scan.json"
    scan_folder(tmp_path / "d", memo=memo)
    assert not memo.exists()                                         # all written just now: nothing remembered
    monkeypatch.setattr(files, "_MEMO_RACY_NS", 0)
    (tmp_path / "d" / "dog" / "junk.jpg").write_bytes(b"not an image")
    checked: list[str] = []
    real = files._check_file
    monkeypatch.setattr(files, "_check_file", lambda path: checked.append(path) or real(path))

    def scan():
        checked.clear()
        report = scan_folder(tmp_path / "d", memo=memo)
        return report.train.items + report.val.items, report.bad_files

    first = scan()
    assert len(checked) == 9 and memo.is_file() and len(first[1]) == 1
    os.utime(memo, (0, 0))
    junk = str(tmp_path / "d" / "dog" / "junk.jpg")
    assert scan() == first and checked == [junk]                    # only the unusable file, again
    assert memo.stat().st_mtime > 0                                 # used: its time moves (zoo prunes by it)
    cat = sorted((tmp_path / "d" / "cat").iterdir())
    cat[0].write_bytes(b"\xff\xd8\xff")                         # damaged since
    second = scan()
    assert checked == [str(cat[0]), junk] and len(second[1]) == 2
    st = os.stat(cat[1])
    cat[1].write_bytes(b"\0" * st.st_size)                        # same size, its times set back (cp -p, rsync -t):
    os.utime(cat[1], ns=(st.st_atime_ns, st.st_mtime_ns))           # the change time still moved
    assert len(scan()[1]) == 3 and checked == [str(cat[0]), str(cat[1]), junk]
    (tmp_path / "d" / "dog" / "junk.jpg").unlink()
    make_image(tmp_path / "d" / "dog" / "junk.jpg", 1, size=16)    # mended since
    assert len(scan()[1]) == 2 and checked == [str(cat[0]), str(cat[1]), junk]
    doc = json.loads(memo.read_text())
    for change in ({"pillow": "0.0"}, {"max_pixels": 1}, {"format": 0}):
        memo.write_text(json.dumps({**doc, "made_with": {**doc["made_with"], **change}}))
        scan()
        assert len(checked) == 9                                   # all checked again, the memo rewritten
    memo.write_text("{damaged")
    assert len(scan()[1]) == 2 and len(checked) == 9 and json.loads(memo.read_text())["files"]
    monkeypatch.setattr(files, "write_json", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    memo.unlink()
    assert len(scan()[1]) == 2 and not memo.exists()               # no memo kept; the scan is the same


def test_a_zip_top_folder_is_named_as_the_data_folder_to_pass(tmp_path):
    """QA: photos.zip extracted as DIR/photos/<class>/ (and DIR/__MACOSX/) failed with "found only 1 class
    (photos) ... a classifier needs at least 2 class folders", which does not say where the classes are."""
    make_image_folder(tmp_path / "d" / "photos", classes=("cat", "dog"), per_class=2, size=16)
    (tmp_path / "d" / "__MACOSX" / "photos").mkdir(parents=True)
    with pytest.raises(DataError, match=r"only 1 class \(photos\) .*; its folders cat, dog look like the classes: "
                                        r"pass .*d/photos as the data folder") as err:
        scan_folder(tmp_path / "d")
    assert "\n" not in str(err.value)
    assert scan_folder(tmp_path / "d" / "photos").classes == ["cat", "dog"]
    # (audit, helper-120: DIR/train/photos/<class>/ and DIR/val/photos/<class>/ had no hint)
    make_image_folder(tmp_path / "s" / "train" / "photos", classes=("cat", "dog"), per_class=2, size=16)
    make_image_folder(tmp_path / "s" / "val" / "photos", classes=("cat", "dog"), per_class=1, size=16)
    with pytest.raises(DataError, match=r"only 1 class \(photos\) .*; its folders cat, dog look like the classes: "
                                        r"move them up into .*s/train/ \(and those of the other split folders"):
        scan_folder(tmp_path / "s")
    make_image(tmp_path / "one" / "cat" / "0.png", 0)        # a single class folder of images: no such hint
    with pytest.raises(DataError, match=r"only 1 class \(cat\) in [^;]*; a classifier needs"):
        scan_folder(tmp_path / "one")


def test_jpegs_saved_as_jfif_and_netpbm_files_are_images(tmp_path):
    """QA: a .jfif (how Windows browsers save JPEGs) and .ppm / .pgm files (torchvision's ImageFolder reads
    them) were skipped as 'not an image file type', though Pillow reads them (zoo predict and eval, which
    filter folders by the same IMAGE_EXTENSIONS, dropped them without a word)."""
    root = make_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=2, size=16)
    for i, (name, fmt) in enumerate((("web.jfif", "JPEG"), ("CAM.JPE", "JPEG"), ("x.ppm", "PPM"), ("y.pgm", None))):
        image = Image.open(make_image(root / "cat" / f"src{i}.png", 0, 16))
        (image.convert("L") if name.endswith(".pgm") else image).save(root / "cat" / name, format=fmt)
        (root / "cat" / f"src{i}.png").unlink()
    report = scan_folder(root)
    assert report.bad_files == [] and report.counts()["train"]["cat"] + report.counts()["val"]["cat"] == 6


def test_a_class_folder_linked_to_another_class_folder_or_into_it_is_refused(tmp_path):
    """QA (helper-64): `kitty -> cat` (or `kitty -> cat/sub`, or two class folders linked into one folder
    elsewhere) trained the same images as both classes without a word (per-class accuracy "cat 0.00,
    kitty 1.00"). The scan refuses it in one line naming the link and where it leads; a class folder
    linked to a folder of its own, outside the data, is read as before."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    (data / "cat" / "sub").mkdir()
    os.replace(data / "cat" / "cat_000.png", data / "cat" / "sub" / "cat_000.png")
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=("fox",), per_class=4) / "fox"
    for link, target in (("kitty", data / "cat"), ("kitty", data / "cat" / "sub"), ("all", data)):
        (data / link).symlink_to(target)
        with pytest.raises(DataError, match=rf"^class folders \w+ and \w+ in {data} hold the same images "
                                            rf"\({link} leads to {target} through a symbolic link\), which would "
                                            "be trained as both classes; remove the link"):
            scan_folder(data)
        (data / link).unlink()
    (data / "fox").symlink_to(elsewhere)
    (data / "wolf").symlink_to(elsewhere / ".." / "fox")       # a second link to that folder: refused too
    with pytest.raises(DataError, match=r"class folders fox and wolf in .* \(wolf leads to .*/elsewhere/fox "):
        scan_folder(data)
    (data / "wolf").unlink()
    assert scan_folder(data).classes == ["cat", "dog", "fox"]


def test_class_folders_whose_names_differ_only_in_unicode_form_are_one_name(tmp_path):
    """QA (session 18): café written composed (NFC, Linux tools) and decomposed (NFD, macOS) were two classes,
    printed alike in every label; a val/ folder copied from a Mac was a class "with no training images"."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    data = make_image_folder(tmp_path / "twins", classes=("a", nfc), per_class=2)
    os.rename(make_image_folder(tmp_path / "other", classes=(nfd,), per_class=2) / nfd, data / nfd)
    with pytest.raises(DataError, match=r"two class folders in .* read caf.* \(written with other Unicode .*rename one"):
        scan_folder(data)
    split = make_image_folder(tmp_path / "split", classes=("a", nfc), per_class=2, layout="split", val_per_class=1)
    os.rename(split / "val" / nfc, split / "val" / nfd)
    report = scan_folder(split)
    assert report.classes == ["a", nfc] and report.counts()["val"] == {"a": 1, nfc: 1}


@pytest.mark.parametrize("twin", ["cat ", " cat", "cat\t", "cat\u00a0"])
def test_class_folders_whose_names_differ_only_in_whitespace_at_an_end_are_refused_quoted(tmp_path, twin):
    """QA (helper-64): class folders `cat` and `cat ` were two classes, printed almost alike in every label.
    Refused at the scan as names equal under NFC are (one class_key), the names quoted so the space shows."""
    data = make_image_folder(tmp_path / "twins", classes=("cat", "dog"), per_class=2)
    os.rename(make_image_folder(tmp_path / "other", classes=(twin,), per_class=2) / twin, data / twin)
    first, second = sorted(["cat", twin])
    with pytest.raises(DataError) as info:
        scan_folder(data)
    assert str(info.value) == (f"two class folders in {data} are named {first!r} and {second!r}, one name but for "
                               "whitespace at an end, and would print alike as two classes; rename one, or move "
                               "the images of one into the other")
    os.rename(data / "cat", data / "kitten")        # alone, a name with a space at an end is a class as before
    assert scan_folder(data).classes == sorted([twin, "dog", "kitten"])


@pytest.mark.parametrize("blank", [" ", "   ", "\t", "\u3000"])
def test_a_class_folder_named_with_whitespace_only_is_refused_with_its_name_quoted(tmp_path, blank):
    """Audit (helper-120): a class folder named " " trained as a class that printed blank in every line (the
    data line, per-class metrics, predictions, the bundle's labels). Refused at the scan, named quoted, as the
    twins `cat` and `cat ` are."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog", blank), per_class=2)
    with pytest.raises(DataError) as info:
        scan_folder(data)
    assert str(info.value) == (f"class folder {blank!r} in {data} is named with whitespace only, and would print "
                               "blank as a class in every line; rename it")


def test_a_hidden_folder_holding_images_is_skipped_and_named_once_debris_is_not(tmp_path):
    """Audit (helper-120): a class folder `.NET/` was ignored with the hidden files without a word (torchvision's
    ImageFolder trains it as a class). Still skipped, named once in the warnings with its images and the fix; a
    hidden folder inside a class too; known debris (.ipynb_checkpoints, .git, .Trash-1000) not."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    for folder, n in ((".NET", 3), ("cat/.edits", 1), (".ipynb_checkpoints", 2), (".git/objects", 1),
                      (".Trash-1000/files", 1), (".notes", 0)):
        (data / folder).mkdir(parents=True)
        for i in range(n):
            make_image(data / folder / f"x{i}.png", 0, 16)
    (data / ".notes" / "a.txt").write_text("not an image")
    report = scan_folder(data, val_split=0.34)
    assert report.classes == ["cat", "dog"] and report.counts()["train"] == {"cat": 2, "dog": 2}
    note = ("skipped hidden folder(s) .NET (3 images), cat/.edits (1 image): a name beginning with '.' is skipped, as "
            "hidden files are; to use its images, rename it without the leading dot")
    assert [w for w in report.warnings if "hidden" in w] == [note]
    shutil.rmtree(data / "dog")         # the class it hides is named where too few are left
    with pytest.raises(DataError, match=r"found only 1 class \(cat\) in .*; skipped hidden folder\(s\) \.NET \(3 "):
        scan_folder(data)


def test_split_named_folders_one_holding_a_single_class_are_splits_not_classes(tmp_path):
    """Review of session 33's scan merges (helper-130): `Training/cat/ + Training/dog/ + Testing/cat/` (a test split
    of one class) trained two classes "Testing" and "Training": the refusal compared the folders below a lone
    folder (Testing/cat/'s none), so it missed that both hold cat/. Compared level by level, it is refused as
    Training/ + Testing/ of two classes is, and zoo eval scores Testing/ (held_out_folder, the same rule)."""
    from finetune.data.scan import held_out_folder

    data = make_image_folder(tmp_path / "d" / "Training", classes=("cat", "dog"), per_class=2).parent
    make_image_folder(data / "Testing", classes=("cat",), per_class=2)
    with pytest.raises(DataError, match=r"holds Training/ and Testing/, whose folders cat are the same classes"):
        scan_folder(data)
    assert held_out_folder(data) == str(data / "Testing")
    other = make_image_folder(tmp_path / "o", classes=("car",), per_class=2)     # a lone images/ on both sides:
    for name in ("testing_kit", "training_wheels"):                             # no class, looked through
        make_image(other / name / "images" / "a.png", 0, 16)
    assert scan_folder(other).classes == ["car", "testing_kit", "training_wheels"] and held_out_folder(other) is None


def test_a_hidden_folder_at_the_top_of_a_split_layout_is_named(tmp_path):
    """Session 32's leftovers (helper-127): `DIR/.train/` beside train/ and val/ was skipped without a word (the
    split layout listed DIR for train/ val/ test/ only), and `DIR/.train/` + `DIR/val/` was refused as "holds val/
    but no train/ folder". Both name it, with the scan's words; `train/.cats/` still is."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2, layout="split", val_per_class=1)
    for folder in (".train/cat", "train/.cats"):
        (data / folder).mkdir(parents=True)
        make_image(data / folder / "x.png", 0, 16)
    report = scan_folder(data)
    assert report.classes == ["cat", "dog"] and report.counts()["train"] == {"cat": 2, "dog": 2}
    assert [w for w in report.warnings if "hidden" in w] == [
        "skipped hidden folder(s) .train (1 image), train/.cats (1 image): a name beginning with '.' is skipped, as "
        "hidden files are; to use its images, rename it without the leading dot"]
    shutil.rmtree(data / "train")
    with pytest.raises(DataError, match=r"holds val/ but no train/ folder \(skipped hidden folder\(s\) \.train \(1 "
                                        r"image\): .*rename it without the leading dot\): put the training images"):
        scan_folder(data)


def test_a_report_moved_to_another_mount_of_the_folder_is_that_mounts_scan(tmp_path):
    """torchrun on several nodes: rank 0's scan is every rank's, each re-rooted where its node reaches the
    folder (ScanReport.moved_to): the same as a scan there, paths outside the folder kept as they are."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    (data / "cat" / "broken.png").write_bytes(b"not an image")
    there = tmp_path / "mnt"
    there.symlink_to(data, target_is_directory=True)      # another path to the same files
    report = scan_folder(data, val_split=0.25, seed=3)
    moved = report.moved_to(str(there))
    direct = scan_folder(there, val_split=0.25, seed=3)
    assert moved.root == direct.root == str(there)
    for name in ("train", "val"):
        assert getattr(moved, name).items == getattr(direct, name).items
    assert moved.bad_files == direct.bad_files and len(moved.bad_files) == 1
    assert moved.fingerprint() == report.fingerprint() and report.moved_to(str(data)) is report
    outside = report.__class__(**{**report.__dict__, "bad_files": [("/elsewhere/x.png", "why")]})
    assert outside.moved_to(str(there)).bad_files == [("/elsewhere/x.png", "why")]


def test_the_decode_failure_log_is_made_only_by_a_failure_so_a_killed_run_leaves_no_empty_file(image_folder,
                                                                                               tmp_path):
    """helper-63: every ImageDataset made an empty zoo-decode-failures-*.tsv in the temp dir at once, removed only
    by its finalizer: a SIGKILLed (or OOM-killed) run left one per dataset. The file is now made by the first
    failure; a run where no image fails writes none, one that fails lists it as before and removes it."""
    import gc
    import signal
    import subprocess
    import sys
    import textwrap

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = textwrap.dedent(f"""
        import os, signal
        from finetune.data import ImageDataset, scan_folder
        from finetune.data.decode import EncodedImageDataset
        report = scan_folder({str(image_folder)!r})
        for ds in (ImageDataset(report.train), EncodedImageDataset(report.train)):
            assert all(ds[i] is not None for i in range(len(ds)))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            env={**os.environ, "TMPDIR": str(scratch)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(scratch.iterdir()) == []

    from finetune.data.decode import EncodedImageDataset

    report = scan_folder(image_folder)
    broken = image_folder / "cat" / "broken.png"
    broken.write_bytes(b"not a png at all")
    for kind in (ImageDataset, EncodedImageDataset):
        ds = kind(ImageSet([report.train.items[0], (str(broken), 0)], report.classes))
        assert ds[0] is not None and not Path(ds.failure_log).exists()
        assert ds[1] is None and Path(ds.failure_log).is_file()
        assert [p for p, _ in ds.failures()] == [str(broken)]
        log = ds.failure_log
        del ds
        gc.collect()
        assert not Path(log).exists()


def test_a_new_file_named_with_a_backslash_is_added_not_taken_for_its_excluded_newline_twin(tmp_path):
    """Review (h77): the split file's accounting matched the run's exclude.txt (a newline in a name written as
    ``\\n``) by printed names only, so a file ``cat/a\\nb.png`` (a backslash) added after the run excluded
    ``cat/a<newline>b.png`` was taken for the excluded file: not called added, and left out by the resume too."""
    from finetune.core.io import printable
    from finetune.tools.doctor import exclude_items

    data = make_image_folder(tmp_path / "data", per_class=3)
    make_image(data / "cat" / "a\nb.png", 1)
    first = scan_folder(data)
    exclude_items(first, ["cat/a\nb.png"])
    write_scan(first, tmp_path / "run")
    make_image(data / "cat" / "a\\nb.png", 2)
    again = scan_folder(data, split_file=tmp_path / "run" / "split.json", left_out=[printable("cat/a\nb.png")])
    assert any(w.startswith("files changed since split file split.json was written: 1 added, 0 removed")
               for w in again.warnings), again.warnings


@pytest.mark.parametrize("deleted", [False, True])
def test_a_split_file_without_validation_images_is_kept_not_refused_with_a_false_reason(tmp_path, deleted):
    """Review (session 24): a run whose --exclude listed every validation image trains without any (its split.json
    records none); its resume was refused with `no validation images in DIR: ... use DIR/<class>/ folders with at
    least 2 images per class so a split can be made`, of a folder with 2 per class, or, once the excluded files were
    deleted, `each of the 3 class folders in DIR holds a single image`, of a run made without validation. The
    split is kept, as the run made it, and said so."""
    from finetune.tools.doctor import exclude_items

    data = make_image_folder(tmp_path / "data", per_class=2)
    first = scan_folder(data)
    val = [first.relpath(p) for p, _ in first.val.items]
    exclude_items(first, val)                               # what --exclude of every validation image leaves
    write_scan(first, tmp_path / "run")
    if deleted:
        for rel in val:
            os.remove(data / rel)
    again = scan_folder(data, split_file=tmp_path / "run" / "split.json", left_out=val)
    kept = sorted(rel for rel, _ in rels(again, again.train))
    assert len(again.val) == 0
    assert kept == sorted([rel for rel, _ in rels(first, first.train)] + ([] if deleted else val))
    assert ("split file split.json records no validation images (its run left every one out, e.g. by --exclude): "
            "the split is kept, so none are validated on") in again.warnings
    if deleted:     # without the split file, the folder's own refusal, as before
        with pytest.raises(DataError, match="each of the 3 class folders in .* holds a single image"):
            scan_folder(data)


def test_a_reorganised_folder_counts_only_the_excluded_file_not_its_newline_twin_as_left_out(tmp_path):
    """Review (helper-81): a flat run's folder reorganised into train/ + val/ is refused when they hold a file its
    exclude.txt lists; that check matched the rows by printed names alone, so a file ``cat/a<newline>b.png`` the run
    trained on counted as left out beside the excluded ``cat/a\\nb.png`` (a backslash), listed exactly: `2 image(s)
    the run left out`. It matches as the exclusion itself does (``files.listed_names``): 1."""
    from finetune.tools.doctor import exclude_items

    data = make_image_folder(tmp_path / "data", per_class=3)
    make_image(data / "cat" / "a\nb.png", 1)
    make_image(data / "cat" / "a\\nb.png", 2)
    first = scan_folder(data)
    exclude_items(first, ["cat/a\\nb.png"])
    write_scan(first, tmp_path / "run")
    sides = {first.relpath(p): side for side, s in (("val", first.val), ("train", first.train)) for p, _ in s.items}
    for cls in ("cat", "dog", "fox"):
        for f in sorted((data / cls).iterdir()):
            (data / sides.get(f"{cls}/{f.name}", "train") / cls).mkdir(parents=True, exist_ok=True)
            f.rename(data / sides.get(f"{cls}/{f.name}", "train") / cls / f.name)
        (data / cls).rmdir()
    with pytest.raises(DataError, match=r"train/ holds 1 image\(s\) the run left out"):
        scan_folder(data, split_file=tmp_path / "run" / "split.json", left_out=["cat/a\\nb.png"])


def test_class_folders_of_phone_photos_are_named_when_too_few_classes_are_left(tmp_path):
    """Dataset-shapes audit (helper-120): a class folder of a phone's HEIC photos beside one of JPEGs failed with
    "found only 1 class (cat) ... needs at least 2 class folders, e.g. DIR/cat/*.jpg and DIR/dog/*.jpg", and a
    folder of HEIC photos alone with "no images found in DIR (6 unreadable files)": the user's dog/ was there,
    and nothing said why it did not count. Both now name the folders and the first file's reason."""
    root = make_image_folder(tmp_path / "d", classes=("cat",), per_class=3, size=16)
    (root / "dog").mkdir()
    (root / "dog" / "IMG_1.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 32)
    (root / "fox").mkdir()
    with pytest.raises(DataError, match=r"only 1 class \(cat\) in [^;]*; class folder\(s\) dog, fox hold no usable "
                                        r"images \(1 file skipped, e.g. dog/IMG_1.HEIC \(not an image file type "
                                        r"\(.heic\)\)\); a classifier needs"):
        scan_folder(root)
    shutil.rmtree(root / "cat")
    (root / "cat").mkdir()
    (root / "cat" / "IMG_2.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 32)
    with pytest.raises(DataError, match=r"no images found in [^;]* \(2 files cannot be used, e.g. cat/IMG_2.heic "
                                        r"\(not an image file type \(.heic\)\)\); expected"):
        scan_folder(root)


def test_a_val_class_named_in_another_case_than_its_training_folder_is_named_with_it(tmp_path):
    """Dataset-shapes audit (helper-120): train/Cat/ beside val/cat/ (one made on macOS, one on Linux) failed
    with "class(es) cat in val/ have no training images in train", naming no cause; the training folder it
    differs from in case alone is named. Two names still (Linux folders, torchvision's ImageFolder)."""
    make_image_folder(tmp_path / "d" / "train", classes=("Cat", "dog"), per_class=2, size=16)
    make_image_folder(tmp_path / "d" / "val", classes=("cat", "dog", "Eel"), per_class=1, size=16)
    with pytest.raises(DataError, match=r"class\(es\) Eel, cat in val/ have no training images in train \(val/cat is "
                                        r"train/Cat in another case: class names are case-sensitive; rename one to "
                                        r"match\); add train"):
        scan_folder(tmp_path / "d")
