"""finetune.tools.doctor: duplicates and leaks, the label probe, outliers, findings.csv, the exclude list, the page."""
from __future__ import annotations

import csv
import html.parser
import json
import random
import re
import shutil

import numpy as np
import pytest

from finetune.core.confusion import FULL_MAX_CLASSES, read_confusion_csv
from finetune.data import scan_folder
from finetune.tools.doctor import (CSV_COLUMNS, DoctorOptions, exclude_items, find_outliers, label_issues,
                             read_exclude_file, run_doctor, write_findings_csv)
from tests.conftest import make_image, make_image_folder

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _clusters(n_per: int = 30, classes: int = 3, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 4
    x = np.concatenate([centres[c] + rng.normal(size=(n_per, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per)
    return x.astype(np.float32), y


@pytest.mark.parametrize("field,value", [("near_threshold", float("nan")), ("pixel_threshold", float("nan")),
                                         ("outlier_z", float("nan")), ("outlier_z", float("inf")),
                                         ("max_aspect", float("nan")), ("max_aspect", float("inf")),
                                         ("probe_l2", float("nan"))])
def test_options_refuse_values_that_switch_a_check_off(field, value):
    """nan passed every `x < bound` test (and inf the open ones), silently disabling a check; the message
    names the one option at fault, with its value."""
    with pytest.raises(ValueError, match=rf"^{field}={value} must be "):
        DoctorOptions(**{field: value}).validate()


def test_a_flipped_label_is_ranked_first_with_its_true_class_suggested():
    x, y = _clusters()
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    flipped = y.copy()
    flipped[7] = 2          # image 7 is class 0, filed under 2
    out = label_issues(z, flipped, 3, folds=5, seed=0)
    order = np.argsort(-out["score"])
    assert order[0] == 7
    assert out["flagged"][7] and out["suggested"][7] == 0
    assert out["flagged"].sum() <= 3        # separable clusters: hardly any false alarm
    # seeded: the same folds, the same probabilities
    again = label_issues(z, flipped, 3, folds=5, seed=0)
    np.testing.assert_allclose(out["probs"], again["probs"])



def test_an_image_whose_label_is_its_most_probable_class_is_never_flagged():
    """Session 26: the flag was "another class j has p_j >= t_j", so an image whose own label was its most probable
    class was a wrong label whenever some weak class (low threshold) came second. Confident learning's C+NR flags
    an image labelled i only when it is among class i's least probable images (by class), among the largest
    margins of a pair the confident joint counts (by noise rate), and some class beats its label. Dyadic
    probabilities: every sum and comparison is exact."""
    from finetune.tools.doctor.labels import confident_flags

    sure0, sure1, sure2 = [0.875, 0.0625, 0.0625], [0.375, 0.4375, 0.1875], [0.0625, 0.0625, 0.875]
    flip = [0.0625, 0.875, 0.0625]              # a class-1 image filed under 0
    close = [0.5, 0.46875, 0.03125]             # labelled 0, 0 most probable, class 1 over its threshold (0.4375)
    p = np.array([sure0] * 5 + [close, flip] + [sure1] * 6 + [sure2] * 6)
    y = np.array([0] * 7 + [1] * 6 + [2] * 6)
    thresholds = np.array([p[y == c, c].mean() for c in range(3)])
    assert p[5, 1] >= thresholds[1]             # the old rule flagged image 5
    flagged = confident_flags(p, y, np.ones(len(y), bool), thresholds)
    assert np.flatnonzero(flagged).tolist() == [6]
    # a class that may not be suggested (threshold inf) neither counts nor makes a flag
    thresholds[1] = np.inf
    assert not confident_flags(p, y, np.ones(len(y), bool), thresholds).any()


def test_noisy_labels_choose_a_stronger_probe_and_are_found():
    """Session 26: with a fixed weak L2 the probe learnt its training folds' wrong labels and believed them in the
    fold it scored (medium digits, 10% flipped: precision 0.64). The strength is chosen by the held-out loss on
    the given labels: flipped labels make it stronger, and the flips are found with few false alarms."""
    from finetune.tools.doctor.labels import L2_PATH

    x, y = _clusters(n_per=40, classes=4)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(100)
    flip = np.zeros(len(y), bool)
    flip[rng.choice(len(y), 24, replace=False)] = True
    noisy = y.copy()
    noisy[flip] = (noisy[flip] + rng.integers(1, 4, flip.sum())) % 4
    clean, dirty = label_issues(z, y, 4), label_issues(z, noisy, 4)
    assert clean["l2"] in L2_PATH and dirty["l2"] in L2_PATH
    assert dirty["l2"] > clean["l2"]
    assert not clean["flagged"].any()
    assert (dirty["flagged"] & flip).sum() >= 20 and (dirty["flagged"] & ~flip).sum() <= 2
    assert (dirty["suggested"][dirty["flagged"] & flip] == y[dirty["flagged"] & flip]).all()
    fixed = label_issues(z, noisy, 4, l2=1e-3)
    assert fixed["l2"] == 1e-3


def test_no_fold_is_scored_at_a_strength_its_own_held_out_labels_chose(monkeypatch):
    """Session 27: the strength was chosen on fold 0 by its held-out loss and fold 0 was then scored at it, so fold
    0's own labels (its flips among them) took part in choosing the probe that judged them. Now one path of
    strengths is fitted without folds 0 and 1 and scored on each: fold 0 is scored at fold 1's choice, fold 1 at
    fold 0's, the other folds at both together's. Faked held-out losses: fold 0's labels want 1.0, fold 1's 1e-3
    (and 1.0 is better for both together)."""
    from finetune.tools.doctor import labels

    x, y = _clusters(n_per=20, classes=3)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    fold = labels._folds(y, 5, 0)
    calls = []

    def path(x_, y_, train, held, n_classes, iters):
        calls.append(sorted(held))
        assert not (train.numpy() & np.isin(fold, [0, 1])).any() and train.sum() == np.isin(fold, [2, 3, 4]).sum()
        assert all((held[k].numpy() == (fold == k)).all() for k in held)
        wants = {0: (1.0, 1.0), 1: (1e-3, 0.5)}
        return {k: {l2: 0.0 if l2 == wants[k][0] else wants[k][1] for l2 in labels.L2_PATH} for k in held}, {}

    monkeypatch.setattr(labels, "_strength_path", path)
    out = label_issues(z, y, 3, folds=5, seed=0)
    assert calls == [[0, 1]]
    assert out["fold_l2"].tolist() == [1e-3, 1.0, 1.0, 1.0, 1.0] and out["l2"] == 1.0
    assert np.allclose(out["probs"].sum(1), 1.0)
    # the rule: each chooser fold at the other's choice, every other fold at their loss per image together
    losses = {3: {1.0: 0.5, 0.1: 0.25}, 1: {1.0: 0.25, 0.1: 0.5}}
    assert labels.fold_strengths(losses, {3: 10, 1: 30}, [0, 1, 2, 3]) == {0: 1.0, 1: 0.1, 2: 1.0, 3: 1.0}
    # per image, not per fold (helper-94: the sizes above tie an unweighted mean too): the bigger fold 3 wants 0.1
    assert labels.fold_strengths(losses, {3: 30, 1: 10}, [0, 1, 2, 3]) == {0: 0.1, 1: 0.1, 2: 0.1, 3: 1.0}
    halves = labels._folds(y, 2, 0)
    calls.clear()

    def two_paths(x_, y_, train, held, n_classes, iters):    # --folds 2: fitted on the one fold, loss on the other
        (k, rows), = held.items()
        calls.append(k)
        assert (rows.numpy() == (halves == k)).all() and (train.numpy() == (halves != k)).all()
        return {k: {l2: 0.0 if l2 == (1.0, 1e-3)[k] else 0.5 for l2 in labels.L2_PATH}}, {}

    monkeypatch.setattr(labels, "_strength_path", two_paths)
    assert label_issues(z, y, 3, folds=2, seed=0)["fold_l2"].tolist() == [1e-3, 1.0] and calls == [0, 1]
    monkeypatch.undo()      # two folds (--folds 2): each fold's probe is the other fold's path; both are scored
    two = label_issues(z, y, 3, folds=2, seed=0)
    assert set(two["fold_l2"].tolist()) <= set(labels.L2_PATH) and two["l2"] == two["fold_l2"][1]


def test_the_calibrated_joint_keeps_each_row_at_its_class_count():
    """Session 27: the calibrated confident joint was rounded cell by cell, so a row could miss its class's count
    (35 images labelled 0, 25 of them confident: 9 / 9 / 7 scale to 12.6 / 12.6 / 9.8, rounded 13 / 13 / 10 = 36),
    and the prune by class (n_i - Q[i, i]) and by noise rate (Q[i, j]) disagreed. Confident learning rounds each
    row preserving its total: the largest remainders round up, 13 / 12 / 10. Dyadic probabilities."""
    from finetune.tools.doctor.labels import calibrated_joint

    p = np.array([[0.75, 0.125, 0.125]] * 9 + [[0.125, 0.75, 0.125]] * 9 + [[0.125, 0.125, 0.75]] * 7
                 + [[0.375, 0.3125, 0.3125]] * 10 + [[0.125, 0.75, 0.125]] * 4 + [[0.125, 0.125, 0.75]] * 4)
    y = np.array([0] * 35 + [1] * 4 + [2] * 4)
    joint = calibrated_joint(p, y, np.ones(len(y), bool), np.full(3, 0.5))
    assert joint.tolist() == [[13, 12, 10], [0, 4, 0], [0, 0, 4]]
    rng = np.random.default_rng(0)
    for _ in range(20):     # any probabilities: every row with a confident image sums to its judged images
        p = rng.dirichlet(np.ones(5) * 0.5, size=200)
        y = rng.integers(0, 5, 200)
        judged = rng.random(200) < 0.9
        thresholds = np.array([p[y == c, c].mean() for c in range(5)])
        joint = calibrated_joint(p, y, judged, thresholds)
        counted = joint.sum(1) > 0
        assert (joint.sum(1)[counted] == np.bincount(y[judged], minlength=5)[counted]).all() and counted.any()


def test_classes_too_small_for_the_probe_neither_are_judged_nor_draw_others_into_wrong_labels():
    """QA session 22: 40 one-image classes beside 3 classes of 30 made 102 "wrong label" findings (62 of the 90 good
    images "probably" one of the one-image classes, and each of those 40): a class of one image is never in the
    probe that scores it, so its self-confidence threshold was near 0. --exclude then dropped them all. A class
    of fewer than MIN_PROBE_IMAGES images is now suggested for no image, and its images are not flagged; the
    flipped label among the big classes is still found."""
    from finetune.tools.doctor.labels import MIN_PROBE_IMAGES

    x, y = _clusters()
    rng = np.random.default_rng(1)
    few = MIN_PROBE_IMAGES - 1
    x = np.concatenate([x, rng.normal(size=(40 * few, x.shape[1])).astype(np.float32) * 4])
    y = np.concatenate([y, np.repeat(np.arange(3, 43), few)])
    y[7] = 2                # image 7 is class 0, filed under 2
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = label_issues(z, y, 43, folds=5, seed=0)
    assert out["flagged"][7] and out["suggested"][7] == 0
    assert not out["flagged"][90:].any() and (out["suggested"] < 3).all()
    assert out["flagged"][:90].sum() <= 3

def test_the_classes_the_label_probe_does_not_judge_are_named_not_passed_over_in_silence(tmp_path):
    """Review of QA session 22: since classes of fewer than MIN_PROBE_IMAGES images are not judged, a folder of
    4 images per class (the probe runs: 12 images, 3 classes) had no wrong_label finding and no word that its
    labels were not checked; before, they were. The log says which classes were passed over and what to do."""
    from finetune.tools.doctor.labels import MIN_PROBE_IMAGES

    data = make_image_folder(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=MIN_PROBE_IMAGES + 1,
                             size=32)
    heard: list[str] = []
    report = scan_folder(data)
    run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0), log=heard.append)
    assert not any("are not checked" in m for m in heard)
    for p in sorted((data / "fox").iterdir())[MIN_PROBE_IMAGES - 1:]:
        p.unlink()
    report = scan_folder(data)
    run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0), log=heard.append)
    assert f"doctor: the labels of 1 class of fewer than {MIN_PROBE_IMAGES} images are not checked (fox): the " \
        "probe that would judge an image of such a class learns too little of it; add images to check them" in heard


@pytest.mark.parametrize("orientation,shown", [(1, (48, 96)), (6, (96, 48)), (8, (96, 48))])
def test_the_size_of_an_exif_rotated_image_is_the_one_it_is_seen_at(tmp_path, orientation, shown):
    """Found by QA session 22, left: the tiny and aspect findings gave an EXIF-rotated JPEG's stored size (48x96
    for a photo seen, and trained on, as 96x48). Read from the header's EXIF, no pixel decoded."""
    from PIL import Image

    from finetune.tools.doctor.checks import file_facts

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    Image.new("RGB", (48, 96), (200, 30, 30)).save(path, exif=exif.tobytes())
    assert file_facts([str(path)])[1] == [shown]



@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_the_size_of_an_image_turned_by_its_xmp_orientation_is_the_one_it_is_seen_at(tmp_path, fmt):
    """QA (helper-109): a photo whose orientation is only in its XMP packet (``tiff:Orientation``, as some editors
    write it) is turned by Pillow and so trained on as 96x48, but the tiny and aspect findings read EXIF only and
    gave its stored 48x96. Still from the header, no pixel decoded."""
    from PIL import Image

    from finetune.data import load_image
    from finetune.tools.doctor.checks import file_facts

    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    path = tmp_path / f"turned.{fmt.lower()}"
    Image.new("RGB", (48, 96), (200, 30, 30)).save(path, fmt, xmp=xmp.encode())
    assert load_image(path).size == (96, 48)
    assert file_facts([str(path)])[1] == [(96, 48)]         # was [(48, 96)]

def test_an_image_far_from_every_class_is_an_outlier():
    x, y = _clusters()
    x[5] = -x[:30].mean(0) * 3        # pointing away from every centroid
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    score, flagged = find_outliers(z, y, 3, z_max=5.0)
    assert flagged[5] and int(np.argmax(score)) == 5
    assert flagged.sum() <= 2


def _leaky_folder(tmp_path):
    data = make_image_folder(tmp_path / "data", layout="split", per_class=8, val_per_class=3, size=32)
    for i, cls in enumerate(("cat", "dog", "fox")):
        make_image(data / "test" / cls / f"{cls}_t.png", i, 32, random.Random(100 + i))
    shutil.copyfile(data / "train" / "cat" / "cat_000.png", data / "test" / "cat" / "leaked.png")
    shutil.copyfile(data / "train" / "dog" / "dog_001.png", data / "train" / "dog" / "dog_copy.png")
    shutil.copyfile(data / "train" / "fox" / "fox_002.png", data / "train" / "cat" / "cat_is_fox.png")
    return data


def _features(report, near: dict[str, str] = ()):
    """Random features per split, with the pairs in ``near`` (relative paths) made nearly identical."""
    rng = np.random.default_rng(0)
    feats = {s: rng.normal(size=(len(v), 32)).astype(np.float32) for s, v in report.sets().items()}
    where = {report.relpath(p): (s, i) for s, v in report.sets().items() for i, (p, _) in enumerate(v.items)}
    for a, b in dict(near).items():
        sa, ia = where[a]
        sb, ib = where[b]
        feats[sb][ib] = feats[sa][ia] + 0.01 * rng.normal(size=32)
    return feats


def _snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def test_exact_and_near_copies_leaks_first(tmp_path):
    data = _leaky_folder(tmp_path)
    before = _snapshot(data)
    report = scan_folder(data)
    near = {"train/fox/fox_005.png": "val/fox/fox_v001.png"}
    # pixel_threshold 1: the drawn test images of one class look alike at 16x16; features decide here
    result = run_doctor(report, features=_features(report, near),
                        options=DoctorOptions(min_side=0, pixel_threshold=1.0))
    kinds = [f.finding for f in result.findings]
    assert kinds[0] == "leak"
    leaks = {(f.path, f.other) for f in result.findings if f.finding == "leak"}
    assert ("train/cat/cat_000.png", "test/cat/leaked.png") in leaks          # exact
    assert ("train/fox/fox_005.png", "val/fox/fox_v001.png") in leaks        # near (features)
    assert {"train/dog/dog_copy.png", "train/dog/dog_001.png"} == {
        *next((f.path, f.other) for f in result.findings if f.finding == "duplicate")}
    cross = [f for f in result.findings if f.finding == "cross_class_duplicate"]
    assert len(cross) == 1 and {cross[0].path, cross[0].other} == {"train/cat/cat_is_fox.png", "train/fox/fox_002.png"}
    assert _snapshot(data) == before        # only read

    out = tmp_path / "findings.csv"
    write_findings_csv(result.findings, out)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(result.findings)
    assert rows[0]["finding"] == "leak" and float(rows[0]["score"]) > 0.9


def test_reencoded_and_resized_copies_are_found_by_their_pixels(tmp_path):
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)

    def photo(path):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((96, 96)).filter(ImageFilter.GaussianBlur(3)).save(path)

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(4):
                photo(tmp_path / "d" / split / cls / f"{i}.png")
    (tmp_path / "d" / "val").mkdir()
    for cls in ("a", "b"):
        (tmp_path / "d" / "val" / cls).mkdir()
        photo(tmp_path / "d" / "val" / cls / "v.png")
    src = Image.open(tmp_path / "d" / "train" / "a" / "0.png")
    src.save(tmp_path / "d" / "test" / "a" / "jpeg60.jpg", quality=60)
    src.resize((67, 67)).save(tmp_path / "d" / "test" / "a" / "small.jpg", quality=90)
    report = scan_folder(tmp_path / "d")
    result = run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0))
    leaks = {(f.path, f.other) for f in result.findings if f.finding == "leak"}
    assert leaks == {("train/a/0.png", "test/a/jpeg60.jpg"), ("train/a/0.png", "test/a/small.jpg")}


def test_a_jpeg_copy_of_a_mid_sized_photo_is_found_by_its_pixels(tmp_path):
    """QA: the fingerprint decoded a JPEG at a reduced scale down to 64 px (4 pixels per thumbnail cell);
    libjpeg's scaled decode of the q60 copy of a 161x131 photo then had cosine 0.976-0.981 with the PNG
    original and the leak was missed (2 of the 206 stamps photos). Now no less than 128 px: 0.999."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                noise = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
                path = tmp_path / "d" / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(noise).resize((161, 131)).filter(ImageFilter.GaussianBlur(2)).save(path)
    Image.open(tmp_path / "d" / "train" / "a" / "0.png").save(tmp_path / "d" / "test" / "a" / "q60.jpg", quality=60)
    report = scan_folder(tmp_path / "d")
    result = run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0))
    leaks = {(f.path, f.other) for f in result.findings if f.finding == "leak"}
    assert leaks == {("train/a/0.png", "test/a/q60.jpg")}


def _colour_folder(root):
    """The same shapes drawn in red, green and blue (three classes) in every split, and two copies of
    train/red/0.png in test/red: JPEG quality 60, and resized to 70 % (JPEG quality 90)."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 40, 210)}
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        for k in range(n):
            for name, colour in colours.items():
                rng = random.Random(f"{split}{k}")          # the same shapes in every colour
                im = Image.new("RGB", (64, 64), (255, 255, 255))
                draw = ImageDraw.Draw(im)
                for _ in range(3):
                    x, y = rng.randint(0, 44), rng.randint(0, 44)
                    box = [x, y, x + rng.randint(10, 30), y + rng.randint(10, 30)]
                    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
                (root / split / name).mkdir(parents=True, exist_ok=True)
                im.save(root / split / name / f"{k}.png")
    src = Image.open(root / "train" / "red" / "0.png")
    src.save(root / "test" / "red" / "q60.jpg", quality=60)
    src.resize((45, 45)).save(root / "test" / "red" / "small.jpg", quality=90)
    return root


def test_the_same_shapes_in_another_colour_are_not_copies(tmp_path):
    """QA: the fingerprint was 16x16 grey levels, mean-centred: a red and a blue copy of one shape had
    cosine 1.0 and 33 images of three colour classes were reported as cross-class duplicates and leaks
    (and `--exclude` dropped them). Colour now counts; the JPEG and resized copies are still found, and
    only against their own original."""
    report = scan_folder(_colour_folder(tmp_path / "d"))
    result = run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0))
    copies = {(f.finding, f.path, f.other) for f in result.findings if f.finding in ("leak", "duplicate",
                                                                                      "cross_class_duplicate")}
    assert copies == {("leak", "train/red/0.png", "test/red/q60.jpg"), ("leak", "train/red/0.png", "test/red/small.jpg"),
                      ("duplicate", "test/red/small.jpg", "test/red/q60.jpg")}


def test_pixel_threshold_one_means_identical_fingerprints(tmp_path):
    """At --near-pixels 1 the fingerprints are compared exactly: the same pixels in another file format
    are a copy (score 1), a JPEG quality-95 copy (cosine just under 1) and the other colours are not."""
    from PIL import Image

    from finetune.tools.doctor import pixel_fingerprint

    data = _colour_folder(tmp_path / "d")
    src = Image.open(data / "train" / "red" / "0.png")
    src.save(data / "test" / "red" / "same.bmp")
    src.save(data / "test" / "red" / "q95.jpg", quality=95)
    a, b = pixel_fingerprint(str(data / "train" / "red" / "0.png")), pixel_fingerprint(str(data / "test" / "red" / "q95.jpg"))
    assert not np.array_equal(a, b) and float(a.astype(np.float64) @ b) > 0.99
    report = scan_folder(data)
    result = run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0, pixel_threshold=1.0))
    copies = [(f.finding, f.path, f.other, f.score) for f in result.findings if f.finding in ("leak", "duplicate",
                                                                                              "cross_class_duplicate")]
    assert copies == [("leak", "train/red/0.png", "test/red/same.bmp", 1.0)]


def test_excluded_paths_follow_a_rename_into_the_other_unicode_form(tmp_path):
    """QA (helper-47): a resume goes on after the class folders were renamed into the other Unicode form (copied
    through macOS), but its exclude.txt (composed names) matched no image any more: the images the run left out
    (duplicates, leaks, wrong labels) trained again from the resumed epoch on. Matched by class_key now, and an
    image listed exactly never takes its decomposed twin with it."""
    import os
    import unicodedata

    nfd = lambda name: unicodedata.normalize("NFD", name)     # noqa: E731
    data = make_image_folder(tmp_path / "data", classes=("élan", "fox"), per_class=4, size=16)
    (data / "élan").rename(data / nfd("élan"))
    names = lambda r: [os.path.basename(p) for s in (r.train, r.val) for p, _ in s.items]     # noqa: E731
    report = scan_folder(data)
    assert exclude_items(report, ["élan/élan_000.png", "fox/fox_000.png"]) == (2, [], {})
    assert len(names(report)) == 6 and not any(n.endswith("_000.png") for n in names(report))
    (data / "fox" / "fox_001.png").rename(data / "fox" / "café.png")
    (data / "fox" / "fox_002.png").rename(data / "fox" / nfd("café.png"))
    report = scan_folder(data)
    assert exclude_items(report, ["fox/café.png"]) == (1, [], {})
    assert nfd("café.png") in names(report) and "café.png" not in names(report)


def test_a_name_with_a_backslash_is_not_excluded_with_its_twin_named_with_a_newline(tmp_path):
    """Review (h77): since exclude.txt writes a newline in a name as ``\\n``, names were matched by their printed
    form only, so ``cat/a\\nb.png`` (a backslash and an n: a Windows-ish name) and ``cat/a<newline>b.png`` were one
    name: listing either (a plain list, a findings.csv row, an older run's exclude.txt) left out both, and the
    split file's accounting counted both as excluded. A name listed exactly is that file only; the printed form
    matches where no file has the listed name (a run's own exclude.txt: the newline written as \\n)."""
    import os

    data = make_image_folder(tmp_path / "data", per_class=4, size=16)
    make_image(data / "cat" / "a\\nb.png", 1, size=16)
    make_image(data / "cat" / "a\nb.png", 2, size=16)
    names = lambda r: [os.path.basename(p) for s in (r.train, r.val) for p, _ in s.items]     # noqa: E731
    for listed, gone in (("cat/a\\nb.png", "a\\nb.png"), ("cat/a\nb.png", "a\nb.png")):
        report = scan_folder(data)
        assert exclude_items(report, [listed]) == (1, [], {}), repr(listed)
        assert gone not in names(report) and len(names(report)) == 13, repr(listed)
    (data / "cat" / "a\\nb.png").unlink()     # alone: a run's exclude.txt line `cat/a\nb.png` is the newline name
    report = scan_folder(data)
    assert exclude_items(report, ["cat/a\\nb.png"]) == (1, [], {}) and "a\nb.png" not in names(report)


def test_excluded_paths_follow_a_class_folder_that_lost_whitespace_at_an_end(tmp_path):
    """Review (h68): class_key strips whitespace at an end since 6c21e2d, so a run's class `cat ` resumes on the
    folder `cat`; its exclude.txt (`cat /...`) matched no image there, and the images the run left out trained
    again (the whole path's class_key strips only its ends). Paths match by each name's class_key now, as the
    split file's."""
    import os

    data = make_image_folder(tmp_path / "data", classes=("cat ", "fox"), per_class=4, size=16)
    (data / "cat ").rename(data / "cat")
    names = lambda r: [os.path.basename(p) for s in (r.train, r.val) for p, _ in s.items]     # noqa: E731
    report = scan_folder(data)
    assert exclude_items(report, ["cat /cat _000.png", "cat "]) == (4, [], {"cat ": 3})
    assert sorted(names(report)) == [f"fox_00{i}.png" for i in range(4)]


def test_exclude_file_and_items(tmp_path):
    data = _leaky_folder(tmp_path)
    report = scan_folder(data)
    result = run_doctor(report, features=_features(report), options=DoctorOptions(min_side=0, pixel_threshold=1.0))
    write_findings_csv(result.findings, tmp_path / "findings.csv")
    listed = read_exclude_file(tmp_path / "findings.csv", kinds=("leak", "duplicate"))
    assert "train/cat/cat_000.png" in listed and "train/dog/dog_copy.png" in listed
    plain = tmp_path / "list.txt"
    plain.write_text("# dropped by hand\ntrain/cat/cat_000.png\n" + str(data / "val" / "dog" / "dog_v000.png") + "\n"
                     "nowhere/x.png\n")
    assert read_exclude_file(plain)[0] == "train/cat/cat_000.png"
    n_train, n_val = len(report.train), len(report.val)
    removed, unmatched, _ = exclude_items(report, read_exclude_file(plain))
    assert removed == 2 and unmatched == ["nowhere/x.png"]
    assert len(report.train) == n_train - 1 and len(report.val) == n_val - 1
    kept = tmp_path / "tiny.csv"      # tiny / aspect rows are reported, not excluded by default
    kept.write_text("path,finding,score,other,split,label,detail\ntrain/a.png,tiny,20,,train,cat,\n"
                    "train/b.png,wrong_label,0.9,dog,train,cat,\n")
    assert read_exclude_file(kept) == ["train/b.png"]
    with pytest.raises(ValueError):
        read_exclude_file(tmp_path / "missing.csv")


def test_a_listed_folder_leaves_out_the_images_in_it(tmp_path, monkeypatch):
    """helper-63: the doctor's row for a folder it could not read ("folder cannot be read", kind unreadable) matched
    no image once the folder was readable again, so `--exclude findings.csv` trained on the images it had listed.
    A listed folder now leaves out every image under it (as the row of an unreadable image leaves the image out
    once it is fixed), in a plain list too; a listed path that is no image and holds none is unmatched. (Tests
    run as root, where chmod 000 does not stop reading: os.scandir refuses as it does for a user.)"""
    import os

    data = make_image_folder(tmp_path / "data", per_class=4, size=16)
    sub = data / "cat" / "locked"
    sub.mkdir()
    for i in range(3):
        (data / "cat" / f"cat_{i:03d}.png").rename(sub / f"cat_{i:03d}.png")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(sub):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        report = scan_folder(data)
    rows = _scan_findings_for(report)
    assert [(f.path, f.finding) for f in rows if f.finding == "unreadable"] == [("cat/locked", "unreadable")]
    findings = tmp_path / "findings.csv"
    write_findings_csv(rows, findings)
    assert read_exclude_file(findings) == ["cat/locked"]

    report = scan_folder(data)          # readable now: its three images are back in the scan
    n = len(report.train) + len(report.val)
    assert exclude_items(report, read_exclude_file(findings)) == (3, [], {"cat/locked": 3})
    assert len(report.train) + len(report.val) == n - 3
    assert not any("/locked/" in p for s in (report.train, report.val) for p, _ in s.items)
    report = scan_folder(data)
    assert exclude_items(report, ["cat", "cat/locked/cat_000.png", "dog/none"]) == (4, ["dog/none"], {"cat": 3})



def test_a_listed_folder_matches_whole_path_components_never_a_name_prefix(tmp_path):
    """Review of helper-63's folder rows: a listed folder leaves out the images under it, matched folder by folder
    up the image's path: `cat` leaves `cats2/` and `cat/burst2/` alone, `cat/burst` takes `cat/burst/` only, a
    listed name that is a prefix of a folder (`ca`, `cat/bur`) matches nothing, and `./cat/` is `cat`."""
    data = make_image_folder(tmp_path / "data", classes=("cat", "cats2"), per_class=4, size=16)
    for sub in ("burst", "burst2"):
        (data / "cat" / sub).mkdir()
        make_image(data / "cat" / sub / "x.png", 0, size=16)
    names = lambda r: sorted(r.relpath(p) for s in (r.train, r.val) for p, _ in s.items)     # noqa: E731
    everything = names(scan_folder(data))
    for listed, folders in [(["cat"], {"cat": 6}), (["./cat/"], {"cat": 6}), (["cat/burst"], {"cat/burst": 1}),
                            (["ca", "cat/bur", "cats"], {})]:
        report = scan_folder(data)
        found = exclude_items(report, listed)
        assert (found.removed, found.folders) == (sum(folders.values()), folders), listed
        under = [f + "/" for f in folders]
        assert names(report) == [p for p in everything if not any(p.startswith(u) for u in under)], listed
        assert found.unmatched == ([] if folders else sorted(listed))

def _scan_findings_for(report):
    from finetune.tools.doctor.run import _scan_findings

    return _scan_findings(report, list(report.classes), DoctorOptions())


def test_features_go_through_the_cache_fit_uses(tmp_path):
    import timm
    import torch

    from finetune.core.config import FinetuneConfig
    from finetune.tools.doctor import folder_features
    from finetune.tools.features import FeatureCache
    from finetune.tools.train import fit

    data = make_image_folder(tmp_path / "data", layout="split", per_class=6, val_per_class=2)
    report = scan_folder(data)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    config = FinetuneConfig(batch_size=8, workers=0, device="cpu", epochs=1, quiet=True)
    cache = tmp_path / "features"
    feats, valid, hits = folder_features(report, model, "fc", DATA_CONFIG, config, cache_dir=cache)
    assert hits == 0 and feats["train"].shape[0] == len(report.train) and valid["train"].all()
    assert folder_features(report, model, "fc", DATA_CONFIG, config, cache_dir=cache)[2] == 2
    stages = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    # The head's training bank is the doctor's single view only without the mirrored view (--hflip 0);
    # with it (the default) fit joins doctor's bank with a pass of the mirror alone, and reuses val. A run that
    # goes on to train the network (NHWC on the CPU) solves its head on the same banks: doctor computes them in the
    # run's layout (QA session 18: doctor's were NCHW there, so a medium CPU run computed them again).
    for freeze, hflip, train_shared in (("head", 0.0, True), ("head", 0.5, False), ("1", 0.0, True)):
        said: list[str] = []
        run = config.replace(freeze=freeze, hflip=hflip, epochs=1 if freeze == "head" else 2)   # 2: a head phase
        fit(model, stages, DATA_CONFIG, report.train, report.val, run,
            head="fc", feature_cache=FeatureCache(cache), log=said.append)
        assert any("train loaded from cache" in m for m in said) == train_shared, said
        # helper-151: the mirrored bank forwards only the mirror, the plain view's is doctor's
        assert any("x 1 view(s) computed" in m and "from the cache" in m for m in said) != train_shared, said
        assert any("val loaded from cache" in m for m in said), said


def test_doctor_after_a_default_run_takes_the_plain_view_of_its_mirrored_bank(tmp_path, monkeypatch):
    """helper-154: a default finetune (its training bank mirrored: view 0 plain, view 1 the mirror) then `zoo doctor`
    on the same folder forwarded the training images again (141 s of doctor's run on digits at 224 px,
    docs/benchmarks.md), though view 0 is doctor's features. Doctor now takes it and forwards nothing; in one batch
    (18 images, batch 32 in both) the features are doctor's own bit for bit, so are the findings. A damaged
    mirrored bank is not used: doctor forwards the training images and finds the same."""
    import timm
    import torch

    import finetune.tools.doctor.run as run_module
    from finetune.core.config import FinetuneConfig
    from finetune.tools.doctor import folder_features
    from finetune.tools.features import FeatureCache
    from finetune.tools.train import fit

    data = make_image_folder(tmp_path / "data", layout="split", per_class=6, val_per_class=2)
    report = scan_folder(data)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    config = FinetuneConfig(batch_size=32, workers=0, device="cpu", epochs=1, quiet=True)
    passes: list[str] = []
    real = run_module.extract_features

    def extract(*args, **kw):
        passes.append(kw["desc"])
        return real(*args, **kw)

    monkeypatch.setattr(run_module, "extract_features", extract)
    doctor = lambda cache: run_doctor(report, model, "fc", DATA_CONFIG, config, cache_dir=cache)   # noqa: E731
    cold = doctor(tmp_path / "cold")
    assert passes == ["features train", "features val"]
    stages = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    fit(model, stages, DATA_CONFIG, report.train, report.val, config.replace(freeze="head", hflip=0.5),
        head="fc", feature_cache=FeatureCache(tmp_path / "run"), log=lambda _m: None)
    mirrored_bank, = (tmp_path / "run").glob("train-*.safetensors")
    assert FeatureCache(tmp_path / "run").load(mirrored_bank.stem).views == 2
    passes.clear()
    warm = doctor(tmp_path / "run")
    assert passes == [] and warm.feature_cache_hits == 2
    assert warm.findings == cold.findings and warm.label_ranking == cold.label_ranking
    feats = [folder_features(report, model, "fc", DATA_CONFIG, config, cache_dir=tmp_path / c)[0]["train"]
             for c in ("cold", "run")]
    assert np.array_equal(feats[0], feats[1])
    assert sorted((tmp_path / "run").glob("train-*")) == [mirrored_bank]     # the plain view is not stored again
    damaged = bytearray(mirrored_bank.read_bytes())
    damaged[-8] ^= 0x55
    mirrored_bank.write_bytes(bytes(damaged))
    passes.clear()
    again = doctor(tmp_path / "run")
    assert passes == ["features train"] and again.feature_cache_hits == 1
    assert again.findings == cold.findings


@pytest.mark.parametrize("quiet", [False, True])
def test_the_feature_pass_shows_a_bar_on_a_terminal_unless_quiet(tmp_path, monkeypatch, quiet):
    """Medium-size UX audit (helper-99): zoo doctor's feature pass, its longest (20 s on 1,797 digits at 224 px,
    minutes on thousands of photos), ran with no bar after "hashing files": `extract_features` took no ``desc``.
    Each split computed now has its bar (a terminal only, cleared when done), none with --quiet."""
    import io
    import sys

    import timm
    import torch

    from finetune.core.config import FinetuneConfig
    from zoo.cli.doctor import _bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    data = make_image_folder(tmp_path / "data", layout="split", per_class=6, val_per_class=2)
    report = scan_folder(data)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    config = FinetuneConfig(batch_size=8, workers=0, device="cpu", quiet=quiet)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)      # (tests/conftest.py sets it; a terminal honours it)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run_doctor(report, model, "fc", DATA_CONFIG, config, options=DoctorOptions(min_side=0), progress=_bar(quiet))
    assert ("features train" in term.getvalue() and "features val" in term.getvalue()) is not quiet


@pytest.mark.parametrize("quiet", [False, True])
def test_the_label_probe_shows_a_bar_on_a_terminal_unless_quiet(tmp_path, monkeypatch, quiet):
    """Medium-size UX audit (helper-99): the out-of-fold label probe (the L2 path, then one L-BFGS fit per fold)
    ran after the `near copies` line with nothing on the terminal: 29 s on 7,188 images, 6.7 s on 1,797. It has
    a bar now (a terminal only, cleared when done), none with --quiet."""
    import io
    import sys

    from finetune.core.config import FinetuneConfig
    from zoo.cli.doctor import _bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    report = scan_folder(_leaky_folder(tmp_path))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)      # (tests/conftest.py sets it; a terminal honours it)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    result = run_doctor(report, features=_features(report), config=FinetuneConfig(quiet=quiet),
                        options=DoctorOptions(min_side=0), progress=_bar(quiet))
    assert result.label_ranking                       # the probe ran
    assert ("label probe: L-BFGS fits" in term.getvalue()) is not quiet


def test_doctor_page_is_self_contained_and_escaped(tmp_path):
    from finetune.tools.pages import doctor_html

    data = make_image_folder(tmp_path / "data", classes=("a<b>&c", "dog"), per_class=6)
    shutil.copyfile(data / "dog" / "dog_000.png", data / "dog" / "dog_copy.png")
    report = scan_folder(data)
    page = doctor_html(run_doctor(report, features=_features(report)))
    assert "a<b>&c" not in page and "a&lt;b&gt;&amp;c" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "data:image/jpeg;base64," in page       # the duplicate's thumbnails are embedded
    check_html(page)


def test_doctor_page_gives_the_probe_strength_only_when_a_probe_ran(tmp_path):
    """Review of session 26: the page's summary gained the probe's L2 strength, written with ``:.3g``, so a folder
    too small for the label probe (its accuracy ``-``) read "out-of-fold accuracy - (L2 nan)". No probe, no
    strength; when one ran, its strength as doctor.json's ``probe_l2``."""
    from finetune.tools.pages import doctor_html

    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3, size=32)
    report = scan_folder(data)
    result = run_doctor(report, features=_features(report))
    assert np.isnan(result.probe_accuracy) and np.isnan(result.probe_l2)      # 6 images: no probe
    page = doctor_html(result)
    check_html(page)
    assert "out-of-fold accuracy -;" in page and "L2" not in page and "nan" not in page.split("near-duplicate")[0]
    result.probe_accuracy, result.probe_l2 = 0.75, 0.03
    assert "out-of-fold accuracy 75.00% (L2 0.03);" in doctor_html(result)


def test_doctor_page_gives_each_folds_strength_when_the_folds_differ(tmp_path):
    """Review of session 27 (helper-94): folds 0 and 1 are scored at each other's choice and the rest at both
    together's, so the folds can differ (25,000 synthetic images of 100 classes: fold 1 at 1e-3, the others at
    3e-3), yet the page and doctor.json gave one strength, the last fold's, as the probe's. DoctorResult keeps
    each fold's (doctor.json: ``probe_fold_l2``) and the page gives their range when they differ."""
    from finetune.tools.pages import doctor_html

    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=8, size=32)
    report = scan_folder(data)
    result = run_doctor(report, features=_features(report))
    assert len(result.probe_fold_l2) == 5 and result.probe_l2 == result.probe_fold_l2[-1]     # 16 images: probed
    result.probe_accuracy, result.probe_l2, result.probe_fold_l2 = 0.75, 3e-3, [1e-3, 3e-3, 3e-3, 3e-3, 3e-3]
    page = doctor_html(result)
    check_html(page)
    assert "out-of-fold accuracy 75.00% (L2 0.001-0.003 by fold);" in page
    result.probe_fold_l2 = [3e-3] * 5
    assert "out-of-fold accuracy 75.00% (L2 0.003);" in doctor_html(result)


def many_class_run(run, n: int) -> tuple[list[str], list[list[int]]]:
    """A run folder holding what the run page reads (scan.json; summary.json and confusion.csv as RunFolder
    writes them) for ``n`` classes of 4 validation images: 2 right, 1 taken for the next class and 1 for
    c000, but all 9 of c007's taken for c003 (the most confused pair, the worst class). No training."""
    from finetune.engine.runfolder import RunFolder

    classes = [f"c{i:03d}" for i in range(n)]
    conf = [[0] * n for _ in range(n)]
    for i in range(n):
        conf[i][i] += 2
        conf[i][(i + 1) % n] += 1
        conf[i][0] += 1
    conf[7] = [9 if j == 3 else 0 for j in range(n)]
    run.mkdir(parents=True)
    (run / "scan.json").write_text(json.dumps({
        "root": "/data", "layout": "flat", "classes": classes,
        "counts": {"train": {c: 10 + i % 7 for i, c in enumerate(classes)}, "val": {c: 4 for c in classes}}}))
    per_class = {c: conf[i][i] / sum(conf[i]) for i, c in enumerate(classes)}
    RunFolder(run).summary({"best_epoch": 1, "classes": classes, "metrics": {
        "val_acc": 0.5, "val_loss": 1.0, "per_class": per_class, "confusion": conf}})
    return classes, conf


def test_summary_keeps_a_small_confusion_one_row_per_line_and_leaves_a_large_one_to_the_csv(tmp_path):
    """QA: 2,000 classes wrote a 44 MB summary.json (indent=2 put each of 4 million counts on its own line).
    Up to FULL_MAX_CLASSES classes summary.json keeps the matrix, one row per line; above, confusion.csv alone
    holds it and summary.json names the file. The CSV has `zoo eval`'s layout and reads back whole."""
    classes, conf = many_class_run(tmp_path / "small", FULL_MAX_CLASSES)
    text = (tmp_path / "small" / "summary.json").read_text()
    doc = json.loads(text)
    assert doc["metrics"]["confusion"] == conf and doc["confusion_csv"] == "confusion.csv"
    assert "      " + json.dumps(conf[7]) + "," in text.splitlines() and len(text.splitlines()) < 4 * FULL_MAX_CLASSES
    assert read_confusion_csv(tmp_path / "small" / "confusion.csv") == (classes, conf)

    classes, conf = many_class_run(tmp_path / "big", 300)
    doc = json.loads((tmp_path / "big" / "summary.json").read_text())
    assert "confusion" not in doc["metrics"] and doc["confusion_csv"] == "confusion.csv"
    assert doc["metrics"]["per_class"]["c007"] == 0.0 and doc["classes"] == classes
    assert (tmp_path / "big" / "summary.json").stat().st_size < 30_000
    rows = list(csv.reader((tmp_path / "big" / "confusion.csv").open(encoding="utf-8")))
    assert rows[0][:3] == ["true \\ predicted", "c000", "c001"] and rows[8][:5] == ["c007", "0", "0", "0", "9"]
    assert read_confusion_csv(tmp_path / "big" / "confusion.csv") == (classes, conf)


def test_class_names_with_a_newline_or_a_tab_are_shown_escaped_on_the_run_page(tmp_path):
    """QA (h72): the console prints a class folder named ``ca<newline>t`` as ``ca\\nt``, but report.html put the
    raw newline (a tab) into its tables, where a browser shows a space: ``ca t``, another name. A config.yaml
    shown as text (not a mapping) keeps its lines."""
    from finetune.engine.runfolder import RunFolder
    from finetune.tools.pages import run_report_html

    run, classes = tmp_path / "run", ["ca\nt", "d\tog"]
    run.mkdir()
    (run / "scan.json").write_text(json.dumps({"root": "/data", "layout": "flat", "classes": classes, "counts": {
        "train": {c: 4 for c in classes}, "val": {c: 2 for c in classes}}}))
    RunFolder(run).summary({"best_epoch": 1, "classes": classes, "metrics": {
        "val_acc": 0.5, "val_loss": 1.0, "per_class": {c: 0.5 for c in classes}, "confusion": [[1, 1], [1, 1]]}})
    (run / "config.yaml").write_text("- lr: 0.1\n- epochs: 2\n")
    page = run_report_html(run)
    check_html(page)
    assert "ca\nt" not in page and "d\tog" not in page
    assert page.count("<td>ca\\nt</td>") >= 2 and "<th>d\\tog</th>" in page
    assert "<pre>- lr: 0.1\n- epochs: 2</pre>" in page


def test_run_page_above_the_class_threshold_lists_worst_classes_and_pairs_not_the_matrix(tmp_path):
    """QA: 2,000 classes drew the whole matrix as an HTML table (4 million cells, 88 MB). Up to
    FULL_MAX_CLASSES the page keeps it; above, TOP_ROWS classes with the fewest images, TOP_ROWS worst
    classes and TOP_ROWS most confused pairs, each with how many more, and where the rest is."""
    from finetune.tools.pages import TOP_ROWS, run_report_html

    many_class_run(tmp_path / "small", FULL_MAX_CLASSES)
    page = run_report_html(tmp_path / "small")
    check_html(page)
    assert "<h3>Confusion matrix</h3>" in page and "Most confused pairs" not in page

    many_class_run(tmp_path / "big", 300)
    page = run_report_html(tmp_path / "big")
    check_html(page)
    assert len(page) < 60_000 and "<h3>Confusion matrix</h3>" not in page
    assert "full matrix (rows: true class, columns: predicted) is in <span class=\"path\">confusion.csv" in page
    data, per_class = page.split("<h2>Per class")
    assert "train 10 to 16 (median 13)" in data and "scan.json" in data and "... and 280 more classes." in data
    fewest = re.findall(r"<tr><td>(c\d+)</td>", data)
    assert len(fewest) == TOP_ROWS and fewest[:3] == ["c000", "c007", "c014"]     # 10 training images each
    worst, pairs = per_class.split("Most confused pairs")
    assert re.findall(r"<tr><td>(c\d+)</td>", worst)[:2] == ["c007", "c003"]      # recall 0; then the lowest F1
    # precision, recall, F1 in percent as zoo eval prints them (they read 0.000), right-aligned as numbers
    assert re.search(r"<tr><td>c007</td>(<td class=\"num\">(-|\d+\.\d\d%)</td>){3}<td class=\"num\">\d+</td></tr>", worst)
    assert '<td class="num">0.00%</td>' in worst and not re.search(r">\d\.\d{3}<", worst)
    assert "... and 280 more classes." in worst
    rows = re.findall(r"<tr><td>(c\d+)</td><td>(c\d+)</td><td class=\"num\">(\d+)</td><td class=\"num\">(\d+%)</td>",
                      pairs)
    assert len(rows) == TOP_ROWS and rows[:2] == [("c007", "c003", "9", "100%"), ("c299", "c000", "2", "50%")]
    assert "... and 577 more pairs with at least one image." in pairs     # 597 non-empty cells off the diagonal


def test_doctor_page_above_the_class_threshold_lists_the_smallest_classes_not_every_class(tmp_path):
    """The doctor page drew a row per class (2,000 rows at 2,000 classes), where the run page lists the
    TOP_ROWS smallest. One rule for both pages now; doctor.json keeps every class's counts."""
    from finetune.tools.doctor import DoctorOptions, DoctorResult
    from finetune.tools.pages import TOP_ROWS, doctor_html

    def page(n: int) -> str:
        classes = [f"c{i:03d}" for i in range(n)]
        counts = {"train": {c: 10 + i % 7 for i, c in enumerate(classes)}, "val": {c: 4 for c in classes}}
        return doctor_html(DoctorResult(root=str(tmp_path), classes=classes, counts=counts, findings=[],
                                        options=DoctorOptions(), images=14 * n))

    small = page(FULL_MAX_CLASSES)
    check_html(small)
    assert len(re.findall(r"<tr><td>c\d+</td>", small)) == FULL_MAX_CLASSES and "more classes" not in small
    big = page(300)
    check_html(big)
    shown = re.findall(r"<tr><td>(c\d+)</td>", big)
    assert len(shown) == TOP_ROWS and shown[:3] == ["c000", "c007", "c014"]      # 10 training images each
    assert "train 10 to 16 (median 13)" in big and "doctor.json" in big and "... and 280 more classes." in big


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr",
            "rect", "line", "polyline", "path", "circle"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                self.errors.append(f"external {name}={value[:40]}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_html(text: str) -> None:
    """Well-formed (every element closed in order), one document, no external resource."""
    assert text.startswith("<!DOCTYPE html>")
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, p.stack


def test_the_feature_threshold_rises_where_different_classes_look_alike():
    """QA: on upscaled digits, pooled ImageNet features of different digits reach cosine 0.96, and 140
    distinct images were reported as leaks at the fixed 0.95. The auto threshold is halfway between the
    99th percentile of each image's most similar other-class image and 1 (at least 0.95): distinct
    look-alikes are no longer copies, a real copy still is; on separated classes it stays 0.95."""
    from finetune.tools.doctor.checks import NEAR_FLOOR, copy_threshold, find_duplicates

    rng = np.random.default_rng(0)
    n, dim = 60, 64
    common = rng.normal(size=dim) * 6                 # what every image shares (one domain, far from ImageNet)
    centres = rng.normal(size=(3, dim)) * 0.6
    y = np.repeat(np.arange(3), n // 3)
    x = common + centres[y] + rng.normal(size=(n, dim)) * 0.8
    x[n - 1] = x[0] + rng.normal(size=dim) * 0.01       # one real copy (same class, another split)
    z = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = [f"c{k}" for k in y]
    splits = ["train"] * (n - 1) + ["test"]
    ok = np.ones(n, dtype=bool)
    near, p = copy_threshold(z, ok, labels)
    assert p > NEAR_FLOOR and near == pytest.approx(p + (1 - p) / 2)
    paths = [f"{s}/{c}/{i}.png" for i, (s, c) in enumerate(zip(splits, labels))]
    hashes = [str(i) for i in range(n)]
    at_floor = find_duplicates(paths, splits, labels, hashes, z, ok, NEAR_FLOOR)
    auto = find_duplicates(paths, splits, labels, hashes, z, ok, near)
    assert len(at_floor) > 10                                          # look-alikes called copies
    assert [(f.finding, f.path, f.other) for f in auto] == [("leak", paths[0], paths[n - 1])]
    x_sep, y_sep = _clusters()
    z_sep = x_sep / np.linalg.norm(x_sep, axis=1, keepdims=True)
    assert copy_threshold(z_sep, np.ones(len(z_sep), bool), [str(k) for k in y_sep])[0] == NEAR_FLOOR


def test_many_copies_of_one_image_are_one_row_per_copy_not_every_pair():
    """QA session 22: 3,000 copies of one placeholder image (a scraped folder's "photo unavailable") were reported
    as every pair of them: 4.5 million findings, a 466 MB findings.csv, 3 GB of memory and 85 s (10,000 copies
    would not have fitted in memory). Copies with the same bytes, features or fingerprint are now one row per
    copy to drop, each the kind a pair of them is (duplicate in one class, cross-class in one split, leak
    across splits), and the same images are dropped by --exclude: all but the one kept.

    Review: each copy is paired with the one kept when that is in another split, so every training copy of a
    validation image is a leak; 17143d4 paired it with the training copy kept in its class, and 16,000 training
    copies of a validation image read "leak: 1" (the other 15,999 "duplicate")."""
    import time

    from finetune.tools.doctor.checks import find_duplicates

    small = ["train/cat/1.png", "train/cat/2.png", "train/dog/3.png", "val/cat/1.png", "val/cat/2.png"]
    splits, labels = [p.split("/")[0] for p in small], [p.split("/")[1] for p in small]
    z = np.ones((len(small), 4), dtype=np.float32) / 2            # identical features too
    rows = {(f.finding, f.path, f.other) for f in find_duplicates(small, splits, labels, ["h"] * 5, z,
                                                                  np.ones(5, bool), 0.95)}
    assert rows == {("leak", "train/cat/2.png", "val/cat/1.png"),
                    ("leak", "train/dog/3.png", "val/cat/1.png"),
                    ("duplicate", "val/cat/2.png", "val/cat/1.png"),
                    ("leak", "train/cat/1.png", "val/cat/1.png")}

    n = 20000
    paths = [f"{'val' if i % 5 == 0 else 'train'}/{'dog' if i % 3 else 'cat'}/p{i:05d}.png" for i in range(n)]
    splits, labels = [p.split("/")[0] for p in paths], [p.split("/")[1] for p in paths]
    thumbs = np.ones((n, 8), dtype=np.float32) / np.sqrt(8)
    start = time.perf_counter()
    found = find_duplicates(paths, splits, labels, ["same"] * n, np.tile(z[:1], (n, 1)), np.ones(n, bool), 0.95,
                            thumbs, np.ones(n, bool))
    assert time.perf_counter() - start < 20
    assert len(found) == n - 1 and len({f.path for f in found}) == n - 1
    kinds = {k: sum(f.finding == k for f in found) for k in ("leak", "cross_class_duplicate", "duplicate")}
    assert kinds == {"leak": n - n // 5, "cross_class_duplicate": 1, "duplicate": n // 5 - 2}
    assert {f.other for f in found if f.finding == "leak"} == {"val/cat/p00000.png"}


def test_thousands_of_near_copies_list_a_few_per_image_and_drop_the_same_images():
    """QA session 22: 2,000 near-identical frames (a video cut into images, each a little different) were every
    pair of them: 85 MB of findings.csv, 1.5 GB and 21 s; 10,000 frames would not have fitted in memory. Each
    image now lists its NEAR_PER_KIND most similar near copies of each kind (so a leak is never crowded out by
    duplicates), and --exclude drops the same images: every one but the first kept."""
    import time

    from finetune.tools.doctor.checks import NEAR_PER_KIND, find_duplicates

    rng = np.random.default_rng(0)
    n = 6000
    z = np.ones((n, 32)) + rng.normal(size=(n, 32)) * 0.01
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    paths = [f"{'val' if i % 10 == 0 else 'train'}/cat/f{i:05d}.png" for i in range(n)]
    splits, labels = [p.split("/")[0] for p in paths], ["cat"] * n
    start = time.perf_counter()
    found = find_duplicates(paths, splits, labels, [str(i) for i in range(n)], z, np.ones(n, bool), 0.95)
    assert time.perf_counter() - start < 60
    per = {}
    for f in found:
        per.setdefault((f.path, f.finding), []).append(f.other)
    assert max(len(v) for v in per.values()) == NEAR_PER_KIND and len(found) <= 2 * NEAR_PER_KIND * n
    assert {f.path for f in found} == set(paths) - {"val/cat/f00000.png"}
    assert all((p, "leak") in per for p in paths if p.startswith("train/"))    # each training frame's leak is listed


@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")])
def test_training_images_with_the_same_features_near_a_validation_image_are_each_its_leak(names):
    """helper-63: identical features are one group, compared with the other images through the one it keeps; of
    two training images with the same features near a validation image, the first by path was the leak and the
    second only its duplicate. Each is now the leak (the same cosine), whichever sorts first, and --exclude drops
    the same images."""
    from finetune.tools.doctor.checks import find_duplicates

    u = np.array([1.0, 0.0, 0.0, 0.0])
    w = np.array([0.97, np.sqrt(1 - 0.97**2), 0.0, 0.0])        # cosine 0.97 with u
    far = np.array([0.0, 0.0, 1.0, 0.0])
    paths = [f"train/cat/{names[0]}.png", f"train/cat/{names[1]}.png", "val/cat/v.png", "train/dog/d.png"]
    splits, labels = [p.split("/")[0] for p in paths], [p.split("/")[1] for p in paths]
    z = np.stack([u, u, w, far]).astype(np.float32)
    found = find_duplicates(paths, splits, labels, ["1", "2", "3", "4"], z, np.ones(4, bool), 0.95)
    leaks = {(f.path, f.other, f.score) for f in found if f.finding == "leak"}
    assert leaks == {("train/cat/a.png", "val/cat/v.png", 0.97), ("train/cat/b.png", "val/cat/v.png", 0.97)}
    assert {(f.finding, f.path, f.other) for f in found} - {("leak", p, o) for p, o, _ in leaks} == \
        {("duplicate", "train/cat/b.png", "train/cat/a.png")}          # the tie itself, as before
    assert "train/dog/d.png" not in {f.path for f in found}


def _svg_ticks(page: str, title: str) -> list[str]:
    """The y tick labels of the SVG chart titled ``title`` (the legend's labels carry a fill, ticks do not)."""
    (svg,) = re.findall(rf"<svg [^>]*aria-label=\"{re.escape(title)}\".*?</svg>", page)
    return re.findall(r"text-anchor=\"end\">([^<]*)</text>", svg)


def _page_of_history(run, acc_scale):
    """report.html of a run whose metrics.csv holds 3 epochs, accuracies 0.2 ... 1.0 times ``acc_scale`` (100: a
    history written in percent), checked as HTML."""
    from finetune.tools.pages import run_report_html

    many_class_run(run, 8)
    rows = [(1, "head", 1.0, 1.0, 0.2, 0.4), (2, "finetune", 0.5, 0.75, 0.6, 0.6), (3, "finetune", 0.0, 0.5, 1.0, 0.8)]
    (run / "metrics.csv").write_text("epoch,phase,train_loss,val_loss,train_acc,val_acc,lr\n" + "".join(
        f"{e},{p},{tl},{vl},{ta * acc_scale:g},{va * acc_scale:g},0.01\n" for e, p, tl, vl, ta, va in rows))
    page = run_report_html(run)
    check_html(page)
    return page


def test_run_page_accuracy_axes_read_in_percent_and_loss_axes_as_they_were(tmp_path):
    """Review (session 24): every accuracy on the page read in percent (accuracy_text) but the accuracy chart's
    axis read 0.2 ... 1; its ticks are now percent, the data (metrics.csv) still fractions, the loss axis as it was.
    A head solved in one step whose every C reached 100% drew its accuracy axis from 50% to 150%."""
    from finetune.engine.runfolder import RunFolder
    from finetune.tools.pages import run_report_html

    run = tmp_path / "run"
    page = _page_of_history(run, 1)
    assert _svg_ticks(page, "accuracy") == ["20%", "40%", "60%", "80%", "100%"]
    assert _svg_ticks(page, "loss") == ["0", "0.25", "0.5", "0.75", "1"]

    (run / "metrics.csv").write_text("epoch,phase,train_loss,val_loss,train_acc,val_acc,lr\n1,head,,,,,\n")
    RunFolder(run).summary({"best_epoch": 1, "classes": [f"c{i:03d}" for i in range(8)], "metrics": {"val_acc": 1.0},
                            "head_solver": [{"C": c, "val_loss": 0.5, "val_acc": 1.0, "chosen": c == 1.0}
                                            for c in (0.1, 1.0, 10.0)]})
    page = run_report_html(run)
    check_html(page)
    ticks = _svg_ticks(page, "validation accuracy against log10 C")
    assert ticks[0] == "95%" and ticks[-1] == "100%" and all(t.endswith("%") for t in ticks)
    assert "%" not in "".join(_svg_ticks(page, "validation loss against log10 C"))


def test_run_page_accuracy_axis_of_a_history_in_percent_reads_as_curves_png_does(tmp_path):
    """Review (helper-78): a metrics.csv whose accuracies are percentages (written by hand or an older tool, which
    curves.png's panel reads as fractions: monitor's percent tolerance) drew report.html's axis 2e+03% ... 1e+04%
    once its ticks were percent; both now read it the same: 20% ... 100%."""
    page = _page_of_history(tmp_path / "run", 100)
    assert _svg_ticks(page, "accuracy") == ["20%", "40%", "60%", "80%", "100%"]


@pytest.mark.parametrize("low", ["0.999", "0.9995", "0.99999"])
def test_run_page_axis_ticks_of_a_narrow_range_are_distinct(tmp_path, low):
    """Review (helper-78): ticks printed to 3 significant digits said one number several times over a narrow range:
    accuracies between 99.9% and 100% read 99.9%, 99.9%, 100%, 100%, 100% (a 99.95% point drawn on a '100%' line);
    each tick now has the digits that tell it from its neighbours, and the two ends as before where they sufficed."""
    from finetune.tools.pages import run_report_html

    run = tmp_path / "run"
    many_class_run(run, 8)
    (run / "metrics.csv").write_text("epoch,phase,train_loss,val_loss,train_acc,val_acc,lr\n"
                                     f"1,head,1.0001,1.0002,{low},{low},0.01\n2,finetune,1.0001,1.0002,1.0,1.0,0.01\n")
    page = run_report_html(run)
    check_html(page)
    for title in ("accuracy", "loss"):
        ticks = _svg_ticks(page, title)
        assert len(set(ticks)) == 5, ticks
    acc = _svg_ticks(page, "accuracy")
    assert acc[-1] == "100%" and all(t.endswith("%") for t in acc)
    assert [float(t[:-1]) for t in acc] == sorted(float(t[:-1]) for t in acc)


def test_a_probe_that_flags_a_large_share_of_the_images_says_what_the_share_means_before_an_exclude_drops_them():
    """helper-83: at scale a weak probe flags whole classes (3,961 of 25,000 images at 100 classes; every image of
    1,000 classes of 10), and `--exclude findings.csv`, the doctor's own advice, drops every wrong_label row. Above
    a tenth of the judged images the log says so; separable clusters (a flipped label) stay silent."""
    from finetune.tools.doctor.run import _probe_findings

    def probe(x, y):
        z = x / np.linalg.norm(x, axis=1, keepdims=True)
        heard: list[str] = []
        names = [f"c{k}" for k in range(int(y.max()) + 1)]
        found = _probe_findings(z, np.ones(len(y), bool), y, [f"{k}.png" for k in range(len(y))],
                                ["train"] * len(y), [names[k] for k in y], names, DoctorOptions(), heard.append)[0]
        return sum(f.finding == "wrong_label" for f in found), [m for m in heard if "wrong labels at" in m]

    x, y = _clusters()
    y[7] = 2
    flagged, said = probe(x, y)
    assert flagged <= 3 and said == []
    noise = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)      # 20 classes the features lack
    flagged, said = probe(noise, np.repeat(np.arange(20), 10))
    assert flagged > 100 and len(said) == 1
    assert said == [f"doctor: the probe calls {flagged:,} of 200 images ({flagged / 200:.0%}) wrong labels at "
                    f"out-of-fold accuracy {said[0].split('accuracy ')[1].split(':')[0]}: more likely classes the "
                    "features cannot tell apart than label errors; look at the suggested classes in findings.csv "
                    "first, since --exclude findings.csv drops every wrong_label row"]


def test_a_wrong_label_finding_shows_the_probes_probabilities_as_every_command_does(monkeypatch):
    """Session 36 (helper-153): a wrong_label finding said `(p=1.00 vs 0.00)` of 0.99996 and 0.00004, where zoo
    predict, eval, report.html and serve's page show a probability by finetune.core.metrics.probability_text."""
    from finetune.core.metrics import probability_text
    from finetune.tools.doctor import run as doctor_run

    real = doctor_run.label_issues

    def sure(*a, **k):      # the probe's probabilities of the flagged image: the suggested class past 99.995%
        out = real(*a, **k)
        out["probs"][7] = 0.0
        out["probs"][7, out["suggested"][7]], out["probs"][7, 2] = 0.99996, 0.00004
        return out

    monkeypatch.setattr(doctor_run, "label_issues", sure)
    x, y = _clusters()
    y[7] = 2                # image 7 is class 0, filed under 2
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    names = ["c0", "c1", "c2"]
    found = doctor_run._probe_findings(z, np.ones(len(y), bool), y, [f"{k}.png" for k in range(len(y))],
                                       ["train"] * len(y), [names[k] for k in y], names, DoctorOptions(),
                                       lambda _m: None)[0]
    (f,) = [f for f in found if f.path == "7.png"]
    assert f.detail == f"labelled c2, probe says c0 ({probability_text(0.99996)} vs {probability_text(0.00004)})"
    assert f.detail.endswith("(>99.99% vs <0.01%)")
